"""The flow-matching loss as a function of tensors (fluxkit.training.loss): random latents and embeddings, a
tiny FLUX transformer built here, no pipeline, no cache, no encoders."""

from types import SimpleNamespace

import pytest
import torch

from fluxkit.families import get as family
from fluxkit.training.loss import flow_matching_loss, sample_timesteps

flux1_velocity = family("flux1").velocity


def settings(**over):
    base = dict(weighting_scheme="none", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, guidance_scale=3.5,
                prior_loss_weight=1.0)
    return SimpleNamespace(**{**base, **over})


@pytest.fixture(scope="module")
def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


@pytest.fixture(scope="module")
def transformer():
    from diffusers import FluxTransformer2DModel

    from fluxkit.tiny.build import PRESETS

    torch.manual_seed(0)
    return FluxTransformer2DModel(**PRESETS["tiny"].transformer)


def batch(bsz=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    # 4 latent channels x 2x2 packing = the tiny transformer's 16 input channels; 8x6 latents (not square)
    return (torch.randn(bsz, 4, 8, 6, generator=g), torch.randn(bsz, 7, 32, generator=g), torch.randn(bsz, 32, generator=g))


class Echo(torch.nn.Module):
    """A 'transformer' that returns its input tokens: the velocity prediction is then the noisy latents."""
    config = SimpleNamespace(guidance_embeds=False)

    def forward(self, hidden_states, **kwargs):
        return (hidden_states,)


def test_flux1_velocity_unpacks_to_the_latents_own_layout():
    noisy, seq, pooled = batch()
    assert torch.equal(flux1_velocity(Echo(), noisy, torch.ones(3), seq, pooled, settings()), noisy)


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"])
def test_loss_equals_its_definition(scheduler, scheme):
    """With a prediction we know (zeros), the loss is the weighted MSE of the true velocity
    (noise - x0), drawn from the same random numbers: noise first, then the timesteps."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    x0, seq, pooled = batch()
    cfg = settings(weighting_scheme=scheme)
    zero = lambda transformer, noisy, *rest: torch.zeros_like(noisy)
    torch.manual_seed(7)
    loss = flow_matching_loss(None, scheduler, x0, seq, pooled, cfg, predict=zero)
    torch.manual_seed(7)
    noise = torch.randn_like(x0)
    sigmas, _ = sample_timesteps(scheduler, cfg, 3, "cpu", x0.dtype)
    weight = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    expected = (weight * (noise - x0) ** 2).mean()
    assert loss.shape == () and torch.allclose(loss, expected, rtol=1e-6)


def test_prior_preservation_term(scheduler):
    """Instance mean + prior_loss_weight x class mean, on an echo prediction (velocity error = x0 - noise + ...)."""
    x0, seq, pooled = batch(bsz=4)
    is_class = torch.tensor([False, True, False, True])
    per = {}
    for w in (0.0, 1.0, 2.5):
        torch.manual_seed(3)
        per[w] = flow_matching_loss(Echo(), scheduler, x0, seq, pooled, settings(prior_loss_weight=w), is_class=is_class)
    torch.manual_seed(3)
    instance_only = flow_matching_loss(Echo(), scheduler, x0[~is_class], seq[~is_class], pooled[~is_class], settings())
    class_part = per[1.0] - per[0.0]
    assert class_part > 0
    assert torch.allclose(per[2.5], per[0.0] + 2.5 * class_part, rtol=1e-5)
    # without class samples the draws differ in size, so compare only that the weight is ignored
    torch.manual_seed(3)
    assert torch.equal(flow_matching_loss(Echo(), scheduler, x0[~is_class], seq[~is_class], pooled[~is_class],
                                          settings(prior_loss_weight=9.0)), instance_only)


def test_tiny_transformer_loss_trains(transformer, scheduler):
    """The real tiny transformer: a finite scalar, the same value for the same seed, gradients on its
    weights, and a few SGD steps on one fixed batch lower it (guidance embedding on: it is FLUX.1-dev's)."""
    x0, seq, pooled = batch(bsz=2)
    cfg = settings(weighting_scheme="logit_normal")

    def loss_at(seed):
        torch.manual_seed(seed)
        return flow_matching_loss(transformer, scheduler, x0, seq, pooled, cfg)

    first = loss_at(0)
    assert first.shape == () and torch.isfinite(first) and torch.equal(first, loss_at(0))
    assert not torch.equal(first, loss_at(1))
    opt = torch.optim.SGD(transformer.parameters(), lr=0.05)
    start = sum(loss_at(s).item() for s in range(4))
    for _ in range(5):
        opt.zero_grad()
        loss = sum(loss_at(s) for s in range(4))
        loss.backward()
        assert transformer.proj_out.weight.grad.abs().sum() > 0
        opt.step()
    assert sum(loss_at(s).item() for s in range(4)) < start


def test_transformer_sees_the_interpolation_at_its_timestep(scheduler):
    """The transformer gets the latents at time t (sigma): (1 - t) x0 + t noise, with timestep t in
    [0, 1] (FLUX scales it by 1000 itself) and the guidance scale when it embeds guidance."""
    seen = {}

    class Recorder(Echo):
        config = SimpleNamespace(guidance_embeds=True)

        def forward(self, hidden_states, timestep, guidance, **kwargs):
            seen.update(timestep=timestep, guidance=guidance)
            return (hidden_states,)

    x0, seq, pooled = batch()
    noisy = {}
    record = lambda transformer, latents, *rest: noisy.setdefault("x", flux1_velocity(transformer, latents, *rest))
    torch.manual_seed(5)
    flow_matching_loss(Recorder(), scheduler, x0, seq, pooled, settings(guidance_scale=4.0), predict=record)
    torch.manual_seed(5)
    noise = torch.randn_like(x0)
    t = seen["timestep"].view(-1, 1, 1, 1)
    assert ((seen["timestep"] > 0) & (seen["timestep"] <= 1)).all()
    assert torch.allclose(noisy["x"], (1 - t) * x0 + t * noise, atol=1e-6)
    assert torch.equal(seen["guidance"], torch.full((3,), 4.0))
