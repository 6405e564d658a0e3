"""FLUX.2 [klein] (4B, 9B): FLUX.2's transformer, VAE and tokens with a Qwen3 text encoder read at
hidden-state layers 9, 18, 27 of a chat-formatted prompt, and no guidance embedding."""

from __future__ import annotations

import torch

from .base import Family
from .flux2 import Flux2

class Flux2Klein(Flux2):
    name = "flux2-klein"
    pipeline_name = "Flux2KleinPipeline"
    components = {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "vae": ("diffusers", "AutoencoderKLFlux2"),
        "tokenizer": ("transformers", "AutoTokenizer"),
        "text_encoder": ("fluxkit.families.prompt_encoders", "Qwen3PromptEncoder"),  # without its output head, ...
    }
    text_encoder_labels = {"text_encoder": ("Qwen3", "sequence")}
    hub_presets = {f"black-forest-labs/FLUX.2-klein-{v}{b}": b.lower() for v in ("", "base-") for b in ("4B", "9B")}
    out_layers = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers
    card_notes = ()  # a plain Qwen tokenizer folder: from_pretrained loads it anywhere

    def validation_prompts(self, args):
        return [args.validation_prompt, ""]  # "": the negative prompt of classifier-free guidance

    def validation_text(self, prompt, embeds, args):
        text = super().validation_text(prompt, embeds, args)
        return text if embeds is None else dict(text, negative_prompt_embeds=embeds[0][1:2])

    def load_pipeline(self, model_path, **kwargs):
        return Family.load_pipeline(self, model_path, **kwargs)  # a plain tokenizer: no processor to stand in for

    def _token_batch(self, m, prompts, max_length):
        texts = [m.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=False) for p in prompts]
        return m.tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=max_length)

FAMILY = Flux2Klein()
