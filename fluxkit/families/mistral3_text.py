"""FLUX.2 [dev]'s text encoder as prompts use it: Mistral3 without its output head and vision tower.

Prompt encoding reads hidden states (layers 10, 20, 30: Flux2Pipeline and fluxkit.families.flux2),
never the next-token logits the output head (lm_head: vocabulary x width, untied from the input
embedding; 0.67B parameters, 1.25 GiB in bf16 in FLUX.2 [dev]) computes from the last layer. Here
the head is neither built nor read: transformers' loader skips a checkpoint key the model has no
parameter for without reading it, so neither the device nor the host holds it, and every encode
skips its matmul (0.69 TFLOP per 512-token prompt) and its logits (128 MiB per prompt in bf16).
Likewise the Pixtral vision tower and its projector (0.44B parameters, 0.82 GiB in bf16): prompts
are text, and the FLUX.2 pipelines' reference images go to the VAE, never to the text encoder, so the
language model's forward never reaches them (it reads them only for pixel_values). The memory plan
counts the encoder through this class (fluxkit.plan.architecture), so without either.

Only text generation needs them (Flux2Pipeline's caption upsampling, which no script of this
toolkit asks for): it is refused with a message. The encoder is frozen and never saved (a trained
pipeline copies the base model's text_encoder folder), so the head is not lost from any output."""

from __future__ import annotations

import torch
from transformers import Mistral3ForConditionalGeneration


class NoOutputHead(torch.nn.Module):
    """Stands where lm_head was: no parameters, and the forward's logits are None."""

    def forward(self, hidden_states):
        return None


class Mistral3PromptEncoder(Mistral3ForConditionalGeneration):
    """Mistral3ForConditionalGeneration (so the FLUX.2 pipeline takes it) without its output head and vision tower."""

    # in the checkpoint (language_model.lm_head.weight as saved, vision_tower.*, multi_modal_projector.*), not loaded
    _keys_to_ignore_on_load_unexpected = [r"lm_head\.", r"vision_tower\.", r"multi_modal_projector\."]
    _tied_weights_keys = {}  # nothing to tie the embedding to

    def __init__(self, config):
        super().__init__(config)
        self.lm_head = NoOutputHead()
        self.model.vision_tower = self.model.multi_modal_projector = None

    def generate(self, *args, **kwargs):
        raise NotImplementedError("this Mistral3 encodes prompts only: its output head and vision tower were left unloaded "
                                  "(fluxkit.families.mistral3_text), so it cannot generate text")
