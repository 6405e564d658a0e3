"""The code block of a LoRA's model card (README.md), for the plain and the pivotal-tuning cards alike."""

from __future__ import annotations

from ..data.pairs import editing_requested


def card_code(args, family, prompt: str, imports=(), after_load=()) -> list[str]:
    """The model card's code: the family's pipeline (and its notes), `after_load` (the LoRA, new tokens), one
    image. The prompt goes by keyword (Kontext's and FLUX.2's pipelines take the reference image first), with the
    reference of an editing run."""
    edit = editing_requested(args)
    call = (["image=load_image('reference.png')"] if edit else []) + [f"prompt={prompt!r}"]
    model, name = args.pretrained_model_name_or_path, family.pipeline_name
    return ["```python", "import torch", f"from diffusers import {name}",
            *(["from diffusers.utils import load_image"] if edit else []), *imports,
            f"pipe = {name}.from_pretrained({model!r}, torch_dtype=torch.bfloat16)",
            *(note.format(model=model) for note in family.card_notes),
            *after_load, f"image = pipe({', '.join(call)}).images[0]", "```"]
