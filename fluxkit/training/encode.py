"""The encoders' side of training: a micro batch's latents and text embeddings, read from the
run's cache (fluxkit.cache) or encoded now, in the form the loss takes (fluxkit.training.loss).

`encode_prompts` and `latent_moments` are the encoders themselves, also used to fill the cache
ahead of training; `encode_batch` turns one loader batch into an `Encoded`. What differs between
FLUX families (which encoders, how latents are scaled) is the run's family's (fluxkit.families).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .offload import encoders_visiting
from ..data.pairs import REFERENCE


@dataclass
class Encoded:
    """One micro batch as the loss takes it, on the device."""
    x0: torch.Tensor             # the family's latents (B, C, H, W) in the compute dtype, from the VAE's moments
    prompt_embeds: torch.Tensor  # sequence embeddings (B, L, D): T5's, or FLUX.2's stacked hidden states
    pooled: torch.Tensor         # pooled embeddings (B, P): CLIP's, with gradients when it trains; P = 0 for FLUX.2
    is_class: torch.Tensor       # (B,) bool: prior-preservation (class) samples
    refs: torch.Tensor | None = None  # editing families: the reference images' latents (B, C, h, w)


def encode_prompts(prompts: list[str], m, args, device):
    """(sequence embeddings (B, L, D), pooled embeddings (B, P)) for a list of prompts, as m's family
    encodes them (args: max_sequence_length and the family's own text flags)."""
    return m.family.encode_prompts(m, prompts, args, device)


def latent_moments(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent distribution of a batch of images: (mean, log-variance)."""
    dist = vae.encode(pixels.to(vae.device, dtype=vae.dtype)).latent_dist
    return dist.mean, dist.logvar


def encode_batch(run, batch) -> Encoded:
    """A loader batch's latents (cached moments, then a sample) and text embeddings (cached; CLIP's
    pooled embedding computed live when it trains). run: fluxkit.training.train.Run."""
    args, m, device = run.args, run.models, run.accelerator.device

    def encode_images(pixels):
        with encoders_visiting(args, m, device):  # --offload_encoders: on the device only while encoding
            return latent_moments(m.vae, pixels)

    def encode_text(prompts):
        with encoders_visiting(args, m, device):
            return encode_prompts(prompts, m, args, device)

    mean, logvar = run.cache.latent_moments(batch["index"].tolist(), batch["pixel_values"], encode_images)
    x0 = m.family.latents(mean, logvar, m.vae).to(run.weight_dtype)  # FLUX.1 samples here: cached = uncached
    refs = None
    if run.dataset.scan.references:  # editing pairs: the reference images' latents, cached like the targets'
        keys = (batch["index"] + REFERENCE).tolist()
        ref_mean, ref_logvar = run.cache.latent_moments(keys, batch.get("cond_pixel_values"), encode_images)
        refs = m.family.reference_latents(ref_mean, ref_logvar, m.vae).to(run.weight_dtype)
    if run.pivot is not None:  # prompts with new tokens: encoded live, never cached (fluxkit.training.pivotal)
        seq, pooled = run.pivot.text_embeddings(batch["prompts"], run.cache, encode_text, m, device)
    else:
        seq, pooled = run.cache.text_embeddings(batch["prompts"], encode_text)
    if run.text_encoder is not None:  # CLIP trains: its pooled embeddings need gradients; T5 stays cached
        pooled = m.family.trained_pooled(m, run.text_encoder, batch["prompts"], device)
    return Encoded(x0, seq, pooled, batch["is_class"].to(device), refs)
