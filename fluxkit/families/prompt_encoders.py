"""The FLUX.2 text encoders as prompts use them: decoder language models read at a few hidden-state
layers (FLUX.2 [dev]'s Mistral3 at 10, 20, 30; [klein]'s Qwen3 at 9, 18, 27: fluxkit.families.flux2),
built without what those reads never reach.

- The output head (lm_head: vocabulary x width): prompts never read the next-token logits. FLUX.2
  [dev]'s is untied from the input embedding (0.67B parameters, 1.25 GiB in bf16), klein 9B's too
  (0.62B); klein 4B's is tied to the embedding, so leaving it out saves its matmul and its logits
  (0.4 TFLOP and 148 MiB in bf16 per 512-token prompt) but no weights.
- The layers after the deepest one read, but one: a model's last hidden state is its final norm's
  output, so hidden state k is a layer's own output only while a layer follows it; the encoder keeps
  layers 1..k+1 for the deepest read k and stops there. FLUX.2 [dev] keeps 31 of 40 layers (5.0B
  parameters, 9.3 GiB in bf16 and 22% of each encode left out), klein 28 of 36. The hidden states
  read are the same tensors, bit for bit (tests/families/test_prompt_encoders.py).
- FLUX.2 [dev]'s Pixtral vision tower and its projector (0.44B parameters, 0.82 GiB in bf16): prompts
  are text, and the FLUX.2 pipelines' reference images go to the VAE, never to the text encoder.

What is left out is never built, and transformers' loader skips a checkpoint key the model has no
parameter for without reading it, so neither the device nor the host holds it. The family decides
how many layers to keep from the layers its prompts read (Family.text_encoder_config, from
--text_encoder_out_layers or the pipeline's defaults) and passes the shortened config; the memory plan
counts the encoder the same way (fluxkit.plan.architecture). Only text generation needs what is
gone (Flux2Pipeline's caption upsampling, which no script of this toolkit asks for): it is refused
with a message. The encoders are frozen and never saved (a trained pipeline copies the base model's
text_encoder folder), so nothing is lost from any output."""

from __future__ import annotations

import copy

import torch
from transformers import Mistral3ForConditionalGeneration, Qwen3ForCausalLM


def keep_layers(config: dict, keep: int) -> dict | None:
    """`config` (a text encoder's config.json as a dict; a multimodal one's text model in text_config)
    built with its first `keep` decoder layers, or None when it has no more than that."""
    text = config.get("text_config", config)
    if keep >= text["num_hidden_layers"]:
        return None
    config = copy.deepcopy(config)
    text = config.get("text_config", config)
    text["num_hidden_layers"] = keep
    if isinstance(text.get("layer_types"), list):
        text["layer_types"] = text["layer_types"][:keep]
    return config


def _skip_checkpoint_layers_from(model, keep: int) -> None:
    """Let the checkpoint's decoder layers from index `keep` on go unread and unreported."""
    kept = "|".join(str(i) for i in range(keep))
    model._keys_to_ignore_on_load_unexpected.add(rf"(^|\.)layers\.(?!(?:{kept})\.)\d+\.")


class NoOutputHead(torch.nn.Module):
    """Stands where lm_head was: no parameters, and the forward's logits are None."""

    def forward(self, hidden_states):
        return None


class _PromptsOnly:
    def generate(self, *args, **kwargs):
        raise NotImplementedError(f"this {type(self).__name__} encodes prompts only: its output head (and deeper layers) "
                                  "were left unloaded (fluxkit.families.prompt_encoders), so it cannot generate text")


class Mistral3PromptEncoder(_PromptsOnly, Mistral3ForConditionalGeneration):
    """Mistral3ForConditionalGeneration (so the FLUX.2 pipeline takes it) without its output head, its
    vision tower and the layers past the ones prompts read."""

    # in the checkpoint (language_model.lm_head.weight as saved, vision_tower.*, multi_modal_projector.*), not loaded
    _keys_to_ignore_on_load_unexpected = [r"lm_head\.", r"vision_tower\.", r"multi_modal_projector\."]
    _tied_weights_keys = {}  # nothing to tie the embedding to

    def __init__(self, config):
        super().__init__(config)
        self.lm_head = NoOutputHead()
        self.model.vision_tower = self.model.multi_modal_projector = None
        _skip_checkpoint_layers_from(self, config.text_config.num_hidden_layers)


class Qwen3PromptEncoder(_PromptsOnly, Qwen3ForCausalLM):
    """Qwen3ForCausalLM (so the FLUX.2 [klein] pipeline takes it) without its output head and the layers
    past the ones prompts read."""

    _keys_to_ignore_on_load_unexpected = [r"lm_head\."]  # klein 9B's untied head; 4B's is the embedding
    _tied_weights_keys = {}

    def __init__(self, config):
        super().__init__(config)
        self.lm_head = NoOutputHead()
        _skip_checkpoint_layers_from(self, config.num_hidden_layers)
