"""The code block of a LoRA's model card (README.md), for the plain and the pivotal-tuning cards alike."""

from __future__ import annotations

from ..data.pairs import editing_requested


def card_code(args, pipeline_name: str, prompt: str, imports=(), after_load=()) -> list[str]:
    """The model card's code: the family's pipeline, `after_load` (the LoRA, new tokens), one image. The prompt
    goes by keyword (Kontext's and FLUX.2's pipelines take the reference image first), with the reference of an
    editing run."""
    edit = editing_requested(args)
    call = (["image=load_image('reference.png')"] if edit else []) + [f"prompt={prompt!r}"]
    return ["```python", "import torch", f"from diffusers import {pipeline_name}",
            *(["from diffusers.utils import load_image"] if edit else []), *imports,
            f"pipe = {pipeline_name}.from_pretrained({args.pretrained_model_name_or_path!r}, torch_dtype=torch.bfloat16)",
            *after_load, f"image = pipe({', '.join(call)}).images[0]", "```"]
