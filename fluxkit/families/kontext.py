"""FLUX.1 Kontext [dev]: FLUX.1's components and encoders; a reference image's latents enter the
transformer as extra tokens after the noisy ones (position ids' first axis 1), and only the noisy
tokens' prediction is trained. Without a reference image it trains text-to-image like FLUX.1."""

from __future__ import annotations

from .flux1 import Flux1


class Kontext(Flux1):
    name = "kontext"
    pipeline_name = "FluxKontextPipeline"
    editing = True
    hub_presets = {"black-forest-labs/FLUX.1-Kontext-dev": "dev"}  # FLUX.1-dev's architecture

    def edit_call(self, image, height, width):
        # the reference at the result's size, as training places it into its target's shape (the
        # pipeline would otherwise resize it to one of its preferred ~1 MP resolutions, and the
        # result to max_area)
        return {"image": image, "max_area": height * width, "_auto_resize": False}

    def render_call(self, image, height, width):
        # without a reference the pipeline still scales the result to max_area (1 MP by default)
        return self.edit_call(image, height, width)


FAMILY = Kontext()
