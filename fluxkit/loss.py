"""The flow-matching objective of FLUX training, and the text and image encodings it needs.

`flow_matching_loss` takes one micro batch: latents from the VAE (through the cache), text
embeddings from CLIP and T5 (through the cache unless CLIP trains), a sampled timestep, and the
weighted MSE between the predicted and the true velocity, plus the prior-preservation term.
"""

from __future__ import annotations

import torch

from .lora import unwrap_model
from .offload import encoders_visiting


def encode_prompts(prompts: list[str], m, max_sequence_length: int, device, text_encoder=None):
    """(T5 sequence embeddings (B, L, D), CLIP pooled embeddings (B, P)) for a list of prompts."""
    text_encoder = text_encoder if text_encoder is not None else m.text_encoder
    clip_ids = m.tokenizer(prompts, padding="max_length", max_length=m.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids.to(device)
    pooled = text_encoder(clip_ids, output_hidden_states=False).pooler_output
    t5_ids = m.tokenizer_2(prompts, padding="max_length", max_length=max_sequence_length,
                           truncation=True, return_tensors="pt").input_ids.to(device)
    seq = m.text_encoder_2(t5_ids, output_hidden_states=False)[0]
    return seq, pooled


def latent_moments(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent distribution of a batch of images: (mean, log-variance)."""
    dist = vae.encode(pixels.to(vae.device, dtype=vae.dtype)).latent_dist
    return dist.mean, dist.logvar


def flow_matching_loss(args, m, transformer, batch, cache, device, weight_dtype, text_encoder=None):
    """One micro batch: sample latents and noise, predict the velocity, weighted MSE (+ prior loss).

    m is the run's Models; cache the run's Cache (fluxkit.cache)."""
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    keys = batch["index"].tolist()
    def encode_images(pixels):
        with encoders_visiting(args, m, device):  # --offload_encoders: on the device only while encoding
            return latent_moments(m.vae, pixels)

    mean, logvar = cache.latent_moments(keys, batch["pixel_values"], encode_images)
    # Sampled here (not inside the VAE) so cached and uncached runs draw the same random numbers.
    x0 = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
    cfg = m.vae.config
    x0 = ((x0 - cfg.shift_factor) * cfg.scaling_factor).to(weight_dtype)

    def encode(prompts):
        with encoders_visiting(args, m, device):
            return encode_prompts(prompts, m, args.max_sequence_length, device)

    if text_encoder is not None:  # CLIP trains: pooled embeddings need gradients; T5 stays cached
        seq, _ = cache.text_embeddings(batch["prompts"], encode)
        clip_ids = m.tokenizer(batch["prompts"], padding="max_length", max_length=m.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids.to(device)
        pooled = text_encoder(clip_ids).pooler_output
    else:
        seq, pooled = cache.text_embeddings(batch["prompts"], encode)

    bsz, channels, h, w = x0.shape
    noise = torch.randn_like(x0)
    u = compute_density_for_timestep_sampling(weighting_scheme=args.weighting_scheme, batch_size=bsz,
                                              logit_mean=args.logit_mean, logit_std=args.logit_std, mode_scale=args.mode_scale)
    indices = (u * m.scheduler.config.num_train_timesteps).long().clamp(max=len(m.scheduler.timesteps) - 1)
    timesteps = m.scheduler.timesteps[indices].to(device)
    sigmas = m.scheduler.sigmas[indices].to(device, dtype=weight_dtype).view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise

    packed = FluxPipeline._pack_latents(noisy, bsz, channels, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(bsz, h // 2, w // 2, device, weight_dtype)
    txt_ids = torch.zeros(seq.shape[1], 3, device=device, dtype=weight_dtype)
    config = unwrap_model(transformer).config
    guidance = torch.full((bsz,), args.guidance_scale, device=device, dtype=weight_dtype) if config.guidance_embeds else None
    pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       pooled_projections=pooled.to(weight_dtype), encoder_hidden_states=seq.to(weight_dtype),
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    vae_scale = 2 ** (len(cfg.block_out_channels) - 1)
    pred = FluxPipeline._unpack_latents(pred, height=h * vae_scale, width=w * vae_scale, vae_scale_factor=vae_scale)

    weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
    per_sample = (weighting.float() * (pred.float() - (noise - x0).float()) ** 2).reshape(bsz, -1).mean(dim=1)
    is_class = batch["is_class"].to(device)
    loss = per_sample[~is_class].mean()
    if is_class.any():
        loss = loss + args.prior_loss_weight * per_sample[is_class].mean()
    return loss
