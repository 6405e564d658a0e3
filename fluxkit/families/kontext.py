"""FLUX.1 Kontext [dev]: FLUX.1's components and encoders; a reference image's latents enter the
transformer as extra tokens after the noisy ones (position ids' first axis 1), and only the noisy
tokens' prediction is trained. Without a reference image it trains text-to-image like FLUX.1."""

from __future__ import annotations

from .flux1 import Flux1


class Kontext(Flux1):
    name = "kontext"
    pipeline_name = "FluxKontextPipeline"
    editing = True


FAMILY = Kontext()
