"""The model-family seam: what differs between FLUX.1, FLUX.1 Kontext, FLUX.2 [dev] and FLUX.2 [klein].

Train, cache, inference and the plan ask a `Family` instead of branching on the model: which
components a pipeline folder holds and the classes that load them, how prompts become the
transformer's text input, how VAE latents become its image tokens and position ids (with a
reference image's tokens for editing families), the default LoRA targets, and the diffusers
pipeline class used for validation, inference and LoRA loading. One module per family:

    flux1        FluxPipeline              CLIP pooled + T5 sequence, 2x2-packed 16-channel latents
    kontext      FluxKontextPipeline       FLUX.1's components; the reference image as extra tokens
    flux2        Flux2Pipeline             Mistral3 hidden-state layers, 128-channel patchified latents
    flux2-klein  Flux2KleinPipeline        Qwen3 hidden-state layers, FLUX.2's latents

The family comes from the folder's model_index.json (`_class_name`); `--model_family` overrides
it where one folder serves two families (a FLUX.1 folder trains Kontext).
"""

from __future__ import annotations

import importlib
import json
import os

from ..shared.errors import UserError
from .base import Family

# family name -> module; the pipeline class names each family's model_index.json carries
_MODULES = {"flux1": "flux1", "kontext": "kontext", "flux2": "flux2", "flux2-klein": "flux2_klein"}
NAMES = tuple(_MODULES)


def get(name: str) -> Family:
    """The family called `name` (one of NAMES)."""
    if name not in _MODULES:
        raise UserError(f"--model_family {name!r} is not a FLUX family; choose one of {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}").FAMILY


def _by_pipeline() -> dict[str, str]:
    return {get(n).pipeline_name: n for n in NAMES}


def pipeline_class_name(model_dir: str) -> str:
    """The `_class_name` in model_dir's model_index.json ('' when there is none)."""
    try:
        with open(os.path.join(model_dir, "model_index.json"), encoding="utf-8") as f:
            return str(json.load(f).get("_class_name", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def of_folder(model_dir: str, override: str | None = None) -> Family:
    """The family of the pipeline folder, or `override` when it can take the folder's components."""
    found = _by_pipeline().get(pipeline_class_name(model_dir))
    if override:
        family = get(override)
        if found is not None and get(found).components != family.components:
            raise UserError(f"--model_family {override} cannot use {model_dir!r}: it holds a {found} pipeline "
                            f"({get(found).pipeline_name}) with other components; drop --model_family or point "
                            f"--pretrained_model_name_or_path at a {override} folder")
        return family
    if found is None:
        raise UserError(f"{model_dir!r} holds a {pipeline_class_name(model_dir) or 'unnamed'} pipeline, which is no FLUX "
                        f"family this toolkit trains ({', '.join(sorted(_by_pipeline()))}); pass --model_family if it is one")
    return get(found)


def of_args(args, model_dir: str) -> Family:
    """The run's family: --model_family, else the folder's."""
    return of_folder(model_dir, args.model_family)


__all__ = ["Family", "NAMES", "get", "of_folder", "of_args", "pipeline_class_name"]
