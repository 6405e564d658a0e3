"""The gpu suite's family cases (bench/suites/gpu.py calls `cases`): a LoRA training step of each other
FLUX family on one accelerator, as the LoRA trainer runs it once the cache is full, beside FLUX.1's
rows:

    Kontext          FLUX.1 Kontext [dev]'s architecture (FLUX.1-dev's) on editing pairs: the reference
                     image's latents enter as many tokens again as the target's
    FLUX.2 [klein]   the 4B architecture, text-to-image
    FLUX.2 [dev]     the 32B transformer, text-to-image (its 24B text encoder is absent: the cache holds
                     the prompts, as the plan has it)

at the family's sensible setting: LoRA rank 16 on the family's default targets, 1024x1024 (the size
the published numbers are measured at: fluxkit.plan.where's rows), batch 1, gradient checkpointing,
the family LoRA script's text length, a bf16 base, or an NF4 base where the plan says bf16 does not
fit this device. The step is the trainer's own code: setup_trainables and build_optimizer
(fluxkit.training.models), the VAE encoder released as release_encoders does, flow_matching_loss with the
family's predictor, on random latents made by the family's `latents`/`reference_latents` (so a
family needs no code here). Each row: s/step, images/s, MFU (the family's FLOP count) against the
measured matmul peak, the device's peak allocated memory beside the plan's training peak for the
same run (planned / measured; on an accelerator whether within gpu.PLAN_TOLERANCE), and the published
numbers for that model.

Everything is built from configs on the device with random bf16 weights (the transformer and the
VAE; no text encoder). On a CPU (--gpu_preset tiny/small) each family's preset of that name runs the
same code at its sample resolution, without a verdict.
"""

from __future__ import annotations

import gc

import torch

from fluxkit.shared import flops
from fluxkit.shared.device import empty_cache, peak_memory_bytes, reset_peak_memory, total_memory_bytes

from .. import harness
from .gpu_memory import _allocated

WARMUP, STEPS = 2, 4
RANK = 16
LARGE_RESOLUTION = 1024
# (row name, fluxkit.families name, the published model whose architecture a large run builds, trains pairs)
FAMILY_CASES = [("Kontext edit", "kontext", "black-forest-labs/FLUX.1-Kontext-dev", True),
                ("FLUX.2 [klein] 4B t2i", "flux2-klein", "black-forest-labs/FLUX.2-klein-4B", False),
                ("FLUX.2 [dev] t2i", "flux2", "black-forest-labs/FLUX.2-dev", False)]
OUT_OF_MEMORY = "out of memory"


def setting(family, model: str, preset: str, resolution: int, edit: bool, device: str, memory: int | None):
    """(plan request, plan) of the family's sensible setting on a device of `memory` bytes (None: unknown):
    a bf16 base, or NF4 where the plan says bf16 does not fit. The request's config is the run's settings
    for the trainer's code (fluxkit.plan.parse reads the trainer's own flags and checks them as it does)."""
    from fluxkit.plan import parse

    argv = ["--pretrained_model_name_or_path", model, "--architecture", preset, "--model_family", family.name, "--lora",
            "--rank", str(RANK), "--lora_alpha", str(RANK), "--resolution", str(resolution), "--train_batch_size", "1",
            "--mixed_precision", "bf16", "--gradient_checkpointing", "--learning_rate", "1e-4",
            "--max_sequence_length", str(family.defaults["max_sequence_length"])]
    argv += ["--cond_image_dir", "pairs"] if edit else []  # editing pairs: the plan counts the reference's tokens
    for quantization in ("none", "nf4"):
        request = parse(argv + ["--base_quantization", quantization])
        plan = request.plan(device, memory)
        if plan.fits is not False:
            break
    return request, plan


def _models(family, preset, args, device: str):
    """fluxkit.training.models.Models with the family preset's transformer (quantized as args say) and VAE,
    random bf16 weights made on the device, the VAE's encoder released (the cache holds the latents)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fluxkit.tiny.build import SCHEDULER_CONFIG
    from fluxkit.training.models import Models
    from fluxkit.training.train import release_encoders
    from fluxkit.weights import quant

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            transformer = family.component_class("transformer")(**preset.transformer)
            vae = family.component_class("vae")(**preset.vae)
    finally:
        torch.set_default_dtype(previous)
    if args.base_quantization == "nf4":
        quant.swap_in_nf4(transformer, torch.bfloat16)
    models = Models(tokenizer=None, tokenizer_2=None, text_encoder=None, text_encoder_2=None, vae=vae,
                    transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
                    model_dir="", family=family)
    release_encoders(models, keep_clip=False, device_type=device)
    return models


def _steps(ctx, models, args, resolution: int, edit: bool) -> tuple[list, int, set]:
    """(step times, peak allocated, the image token counts the transformer saw) of WARMUP + STEPS LoRA steps
    on one random sample (and its reference)."""
    from fluxkit.training.loss import flow_matching_loss
    from fluxkit.training.models import build_optimizer, setup_trainables

    device, dtype, family = torch.device(ctx.device.type), torch.bfloat16, models.family
    trainables = setup_trainables(args, models, dtype)
    models.transformer.enable_gradient_checkpointing()
    optimizer = build_optimizer(args, trainables, args.learning_rate)
    vae, config = models.vae, models.transformer.config
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    side = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    moments = (1, vae.config.latent_channels, side, side)  # the VAE's, as the cache holds them
    x0 = family.latents(rand(*moments), torch.zeros(moments, device=device, dtype=dtype), vae)
    refs = family.reference_latents(rand(*moments), None, vae) if edit else None
    text = rand(1, args.max_sequence_length, config.joint_attention_dim)
    pooled = rand(1, getattr(config, "pooled_projection_dim", None) or 0)  # FLUX.2 has no pooled embedding
    seen = set()
    models.transformer.register_forward_pre_hook(lambda _, args, kwargs: seen.add(kwargs["hidden_states"].shape[1]),
                                                 with_kwargs=True)
    gc.collect()
    empty_cache(device.type)
    reset_peak_memory(ctx.device)

    def step():
        with torch.autocast(device.type, dtype=dtype):
            loss = flow_matching_loss(models.transformer, models.scheduler, x0, text, pooled, args,
                                      predict=family.predictor(refs))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = harness.timed_steps(ctx.device, step, WARMUP, STEPS)
    return times, peak_memory_bytes(ctx.device), seen


def _published(model: str) -> str:
    """The published measurements of comparable runs of `model` (fluxkit.plan.where's rows)."""
    from fluxkit.plan.where import ROWS

    return "; ".join(dict.fromkeys(r.published for r in ROWS if r.model == model)) or "none"


def _run(ctx, family, preset, args, resolution: int, edit: bool):
    """(step times, peak allocated above what was there before, image tokens per step) of the case, None when
    the device ran out of memory; everything it built is freed after."""
    before, models = _allocated(ctx), None
    try:
        models = _models(family, preset, args, ctx.device.type)
        times, peak, seen = _steps(ctx, models, args, resolution, edit)
        result = times, peak - before, max(seen)
    except torch.OutOfMemoryError:  # a plan that said the run fits: that is the verdict
        result = None
    del models
    gc.collect()
    empty_cache(ctx.device.type)
    return result


def _case(ctx, name: str, family_name: str, model: str, edit: bool, preset_name: str, large: bool,
          matmul_peak: float, tolerance: float) -> tuple[dict, str | None]:
    """(row, verdict note or None) of one family's case."""
    from fluxkit import families
    from fluxkit.tiny.build import resolve_preset

    family = families.get(family_name)
    preset_name = family.hub_presets[model] if large else preset_name
    preset = resolve_preset(preset_name, family.name)
    resolution = LARGE_RESOLUTION if large else preset.sample_resolution
    memory = total_memory_bytes(ctx.device) if ctx.device.has_accelerator else None
    request, plan = setting(family, model, preset_name, resolution, edit, ctx.device.type, memory)
    args = request.config
    planned = max(p.bytes for p in plan.phases if p.name.startswith("train"))
    base = "bf16" if args.base_quantization == "none" else args.base_quantization
    case = f"{name}, {family_name} {preset_name}, LoRA r{RANK}, {resolution}x{resolution}, batch 1, grad ckpt, {base} base"
    ctx.log(f"gpu: {case}")
    row = {"table": "family LoRA training step", "case": case,
           "params": {"text tokens": args.max_sequence_length, "published": _published(model)},
           "metrics": {"planned GB": planned / 2**30}}
    verdict = f"target: the memory plan within {tolerance:.0%} of the device's peak ({name}): "
    result = _run(ctx, family, preset, args, resolution, edit)
    if result is None:
        row["metrics"]["s/step"] = OUT_OF_MEMORY
        return row, verdict + f"NOT met (out of memory; planned {planned / 2**30:.2f} GiB)"
    times, measured, tokens = result
    step_flops = flops.training_step_flops(plan.arch.transformer, tokens, args.max_sequence_length, batch=1,
                                           frozen_base=True, flop_parts=family.flop_parts())
    row["params"]["image tokens"] = tokens  # what the transformer ran over: an editing pair's reference included
    row["metrics"] = {"s/step": harness.summarize(times), "images/s": harness.summarize(1 / t for t in times),
                      "MFU % (measured peak)": harness.summarize(100 * flops.mfu(step_flops, t, matmul_peak) for t in times),
                      "peak mem GB": measured / 2**30, **row["metrics"]}
    if not ctx.device.has_accelerator:
        row["metrics"]["planned / measured"] = "n/a (CPU RSS)"
        return row, None
    within = abs(planned / measured - 1) <= tolerance
    row["metrics"].update({"planned / measured": planned / measured, f"within {tolerance:.0%}": "yes" if within else "NO"})
    return row, verdict + (f"{'met' if within else 'NOT met'} (planned {planned / 2**30:.2f} GiB / measured "
                           f"{measured / 2**30:.2f} GiB = {planned / measured:.3f})")


def cases(ctx, preset, matmul_peak: float, tolerance: float) -> tuple[list, list]:
    """(rows, notes) of every family's case; see the module doc."""
    rows, notes = [], []
    for name, family_name, model, edit in FAMILY_CASES:
        row, note = _case(ctx, name, family_name, model, edit, preset.name, preset.large, matmul_peak, tolerance)
        rows.append(row)
        if note:
            notes.append(note)
    if not preset.large:
        notes.append(f"family cases: preset {preset.name} of each family at its sample resolution on {ctx.device.type}, "
                     "a check of the code path, not a GPU measurement")
    return rows, notes
