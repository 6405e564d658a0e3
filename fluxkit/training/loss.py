"""The flow-matching objective of FLUX training, as a function of tensors.

`flow_matching_loss` takes one micro batch already encoded (fluxkit.training.encode.encode_batch): the
scaled VAE latents x0, the T5 sequence and CLIP pooled embeddings. It draws noise and a timestep,
asks the transformer for the velocity, and returns the weighted MSE against the true velocity,
plus the prior-preservation term for class samples. Nothing here reads a cache or runs an encoder,
so it runs on random tensors and a tiny transformer alone.

The one model-family-specific step is `predict`: how latents become tokens with position ids and
the transformer's output becomes latents again. Each family (fluxkit.families) has its own
(Family.velocity, or Family.predictor(refs) with a reference image's tokens); FLUX.1's is the default.
"""

from __future__ import annotations

import torch

def flow_matching_loss(transformer, scheduler, x0, prompt_embeds, pooled, cfg, is_class=None, predict=None):
    """The training loss of one micro batch (a scalar tensor).

    x0: scaled latents (B, C, H, W) in the compute dtype, on the device; prompt_embeds (B, L, D) and
    pooled (B, P): the text embeddings; cfg: the run's settings (weighting_scheme, logit_mean,
    logit_std, mode_scale, guidance_scale, prior_loss_weight); is_class: (B,) bool, the
    prior-preservation samples (None: none); predict: the family's velocity prediction
    (default FLUX.1's)."""
    noise = torch.randn_like(x0)  # drawn before the timesteps: the order of random draws is part of a run
    sigmas, timesteps = sample_timesteps(scheduler, cfg, x0.shape[0], x0.device, x0.dtype)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    if predict is None:
        from ..families import get

        predict = get("flux1").velocity
    pred = predict(transformer, noisy, timesteps, prompt_embeds, pooled, cfg)
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
