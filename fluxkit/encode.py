"""The encoders' side of training: a micro batch's latents and text embeddings, read from the
run's cache (fluxkit.cache) or encoded now, in the form the loss takes (fluxkit.loss).

`encode_prompts` and `latent_moments` are the encoders themselves, also used to fill the cache
ahead of training; `encode_batch` turns one loader batch into an `Encoded`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .offload import encoders_visiting


@dataclass
class Encoded:
    """One micro batch as the loss takes it, on the device."""
    x0: torch.Tensor             # scaled latents (B, C, H, W) in the compute dtype, sampled from the VAE's moments
    prompt_embeds: torch.Tensor  # T5 sequence embeddings (B, L, D)
    pooled: torch.Tensor         # CLIP pooled embeddings (B, P); with gradients when CLIP trains
    is_class: torch.Tensor       # (B,) bool: prior-preservation (class) samples


def clip_ids(tokenizer, prompts: list[str], device):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)


def encode_prompts(prompts: list[str], m, max_sequence_length: int, device, text_encoder=None):
    """(T5 sequence embeddings (B, L, D), CLIP pooled embeddings (B, P)) for a list of prompts."""
    text_encoder = text_encoder if text_encoder is not None else m.text_encoder
    pooled = text_encoder(clip_ids(m.tokenizer, prompts, device), output_hidden_states=False).pooler_output
    t5_ids = m.tokenizer_2(prompts, padding="max_length", max_length=max_sequence_length,
                           truncation=True, return_tensors="pt").input_ids.to(device)
    seq = m.text_encoder_2(t5_ids, output_hidden_states=False)[0]
    return seq, pooled


def latent_moments(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent distribution of a batch of images: (mean, log-variance)."""
    dist = vae.encode(pixels.to(vae.device, dtype=vae.dtype)).latent_dist
    return dist.mean, dist.logvar


def encode_batch(run, batch) -> Encoded:
    """A loader batch's latents (cached moments, then a sample) and text embeddings (cached; CLIP's
    pooled embedding computed live when it trains). run: fluxkit.train.Run."""
    args, m, device = run.args, run.models, run.accelerator.device

    def encode_images(pixels):
        with encoders_visiting(args, m, device):  # --offload_encoders: on the device only while encoding
            return latent_moments(m.vae, pixels)

    def encode_text(prompts):
        with encoders_visiting(args, m, device):
            return encode_prompts(prompts, m, args.max_sequence_length, device)

    mean, logvar = run.cache.latent_moments(batch["index"].tolist(), batch["pixel_values"], encode_images)
    # Sampled here (not inside the VAE) so cached and uncached runs draw the same random numbers.
    x0 = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
    vae = m.vae.config
    x0 = ((x0 - vae.shift_factor) * vae.scaling_factor).to(run.weight_dtype)
    if run.pivot is not None:  # prompts with new tokens: encoded live, never cached (fluxkit.pivotal)
        seq, pooled = run.pivot.text_embeddings(batch["prompts"], run.cache, encode_text, m, device)
        return Encoded(x0, seq, pooled, batch["is_class"].to(device))
    seq, pooled = run.cache.text_embeddings(batch["prompts"], encode_text)
    if run.text_encoder is not None:  # CLIP trains: its pooled embeddings need gradients; T5 stays cached
        pooled = run.text_encoder(clip_ids(m.tokenizer, batch["prompts"], device)).pooler_output
    return Encoded(x0, seq, pooled, batch["is_class"].to(device))
