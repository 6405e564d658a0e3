"""The flow-matching objective of FLUX training, as a function of tensors.

`flow_matching_loss` takes one micro batch already encoded (fluxkit.encode.encode_batch): the
scaled VAE latents x0, the T5 sequence and CLIP pooled embeddings. It draws noise and a timestep,
asks the transformer for the velocity, and returns the weighted MSE against the true velocity,
plus the prior-preservation term for class samples. Nothing here reads a cache or runs an encoder,
so it runs on random tensors and a tiny transformer alone.

The one model-family-specific step is `predict`: FLUX.1 packs latents 2x2 into tokens and gives
the transformer position ids (flux1_velocity). A family with other packing or extra tokens (a
reference image's latents) passes its own `predict` with the same signature.
"""

from __future__ import annotations

import torch

from .lora import unwrap_model


def flow_matching_loss(transformer, scheduler, x0, prompt_embeds, pooled, cfg, is_class=None, predict=None):
    """The training loss of one micro batch (a scalar tensor).

    x0: scaled latents (B, C, H, W) in the compute dtype, on the device; prompt_embeds (B, L, D) and
    pooled (B, P): the text embeddings; cfg: the run's settings (weighting_scheme, logit_mean,
    logit_std, mode_scale, guidance_scale, prior_loss_weight); is_class: (B,) bool, the
    prior-preservation samples (None: none); predict: the family's velocity prediction
    (default flux1_velocity)."""
    noise = torch.randn_like(x0)  # drawn before the timesteps: the order of random draws is part of a run
    sigmas, timesteps = sample_timesteps(scheduler, cfg, x0.shape[0], x0.device, x0.dtype)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    pred = (predict or flux1_velocity)(transformer, noisy, timesteps, prompt_embeds, pooled, cfg)
    if is_class is None:
        is_class = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
    return weighted_mse(pred, noise - x0, sigmas, cfg, is_class)


def sample_timesteps(scheduler, cfg, batch_size: int, device, dtype):
    """(sigmas (B, 1, 1, 1) in dtype, timesteps (B,)) drawn by --weighting_scheme's density."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(weighting_scheme=cfg.weighting_scheme, batch_size=batch_size,
                                              logit_mean=cfg.logit_mean, logit_std=cfg.logit_std, mode_scale=cfg.mode_scale)
    indices = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1)
    timesteps = scheduler.timesteps[indices].to(device)
    sigmas = scheduler.sigmas[indices].to(device, dtype=dtype).view(-1, 1, 1, 1)
    return sigmas, timesteps


def flux1_velocity(transformer, noisy, timesteps, prompt_embeds, pooled, cfg):
    """FLUX.1's prediction of the velocity for noisy latents (B, C, H, W): pack 2x2 patches into
    tokens, run the transformer, unpack to the latents' shape."""
    from diffusers import FluxPipeline

    bsz, channels, h, w = noisy.shape
    device, dtype = noisy.device, noisy.dtype
    packed = FluxPipeline._pack_latents(noisy, bsz, channels, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(bsz, h // 2, w // 2, device, dtype)
    txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
    guidance = None
    if unwrap_model(transformer).config.guidance_embeds:
        guidance = torch.full((bsz,), cfg.guidance_scale, device=device, dtype=dtype)
    pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       pooled_projections=pooled.to(dtype), encoder_hidden_states=prompt_embeds.to(dtype),
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    # the latents' own size: a scale factor of 1 makes the pipeline's unpacking a pure token -> patch reshape
    return FluxPipeline._unpack_latents(pred, height=h, width=w, vae_scale_factor=1)


def weighted_mse(pred, target, sigmas, cfg, is_class):
    """Mean of the per-sample weighted squared error over instance samples, plus
    cfg.prior_loss_weight x the mean over class samples when the batch has any."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    weighting = compute_loss_weighting_for_sd3(weighting_scheme=cfg.weighting_scheme, sigmas=sigmas)
    per_sample = (weighting.float() * (pred.float() - target.float()) ** 2).reshape(pred.shape[0], -1).mean(dim=1)
    loss = per_sample[~is_class].mean()
    if is_class.any():
        loss = loss + cfg.prior_loss_weight * per_sample[is_class].mean()
    return loss
