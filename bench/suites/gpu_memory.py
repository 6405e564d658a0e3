"""The gpu suite's memory ladder (bench/suites/gpu.py calls `ladder`): LoRA training steps as the
trainer runs them once the cache is full (no encoder on the device), on FLUX.1-dev's architecture
with random weights, one rung per row, after the encode phase itself (T5, CLIP and the VAE encoding
one prompt and one image, no transformer: the device's peak beside the plan's encode phase):

    bf16 LoRA        rank 16, bf16 base (published: HF bf16 LoRA about 26 GB)
    HF QLoRA recipe  rank 4, NF4 base, 8-bit Adam (published: about 9 GB on an RTX 4090)
    block offload    the QLoRA recipe with 16 / 22 / 28 blocks swapped (kohya's ladder counts)

all at 512 px, batch 1, gradient checkpointing. Each row: s/step, the device's peak allocated
memory during the steps, and the plan's training peak for the same run (fluxkit.plan, the larger
of its forward+backward and optimizer-step phases) with planned / measured; on an accelerator the
verdict is whether they agree within gpu.PLAN_TOLERANCE. On a CPU (a small preset) it runs the same
code without a verdict (the peak there is the process's RSS; 8-bit Adam, which needs CUDA, is
replaced by AdamW).
"""

from __future__ import annotations

import gc
from argparse import Namespace

import torch

from fluxkit.shared import flops
from fluxkit.shared.device import device_module, empty_cache, peak_memory_bytes, reset_peak_memory

from .. import harness

WARMUP, STEPS = 2, 4


def _allocated(ctx) -> int:
    """What the device holds before a case starts (its peak is measured above it); 0 on a CPU."""
    module = device_module(ctx.device)
    return int(module.memory_allocated()) if module is not None else 0
T5_TOKENS = 77
KOHYA_SWAPS = (16, 22, 28)
# (case, rank, base quantization, 8-bit Adam, blocks to swap, published measurement)
RUNGS = [("bf16 LoRA r16", 16, "none", False, 0, "HF bf16 LoRA: 26 GB"),
         ("HF QLoRA recipe (NF4 r4, 8-bit Adam)", 4, "nf4", True, 0, "HF QLoRA: about 9 GB (RTX 4090, 512x768)")]
RUNGS += [(f"QLoRA + --blocks_to_swap {n}", 4, "nf4", True, n, f"kohya (fp8 base): {gb} GB")
          for n, gb in zip(KOHYA_SWAPS, (12, 10, 8))]


def _transformer(preset, device, quantization: str):
    """The transformer alone with random bf16 weights on the device, its Linear weights quantized as asked."""
    from diffusers import FluxTransformer2DModel

    from fluxkit.weights import quant

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            t = FluxTransformer2DModel(**preset.transformer)
    finally:
        torch.set_default_dtype(previous)
    t.requires_grad_(False)
    if quantization == "nf4":
        quant.swap_in_nf4(t, torch.bfloat16)
    return t


def _optimizer(params, eight_bit: bool, device):
    if eight_bit and device.type == "cuda":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4)


def _planned(preset_name: str, res: int, rank: int, quantization: str, eight_bit: bool, swap: int, device: str) -> int:
    from fluxkit.plan import parse

    request = parse(["--pretrained_model_name_or_path", preset_name, "--architecture", preset_name, "--lora", "--rank", str(rank),
                  "--lora_alpha", str(rank), "--resolution", str(res), "--train_batch_size", "1", "--mixed_precision", "bf16",
                  "--max_sequence_length", str(T5_TOKENS), "--gradient_checkpointing", "--base_quantization", quantization,
                  "--blocks_to_swap", str(swap)] + (["--use_8bit_adam"] if eight_bit else []))
    plan = request.plan(device)
    return max(p.bytes for p in plan.phases if p.name.startswith("train"))


def _steps(ctx, t, res: int, vae_scale: int, rank: int, eight_bit: bool, swap: int) -> tuple[list, int, int]:
    """(step times, peak allocated, blocks resident at most) of WARMUP + STEPS LoRA steps."""
    from peft import LoraConfig

    from fluxkit.training import blockswap
    from fluxkit.families.flux1 import FAMILY as FLUX1

    device = torch.device(ctx.device.type)
    t.enable_gradient_checkpointing()
    t.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(FLUX1.lora_targets)))
    params = [p for p in t.parameters() if p.requires_grad]
    for p in params:  # as the trainer: fp32 adapters over the frozen base, under bf16 autocast
        p.data = p.data.float()
    swapper = blockswap.place(Namespace(blocks_to_swap=swap), t, device)
    opt = _optimizer(params, eight_bit, device)
    cfg, tokens = t.config, flops.image_tokens(res, res, vae_scale)
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, torch.bfloat16)  # noqa: E731
    x0, noise, text, pooled = (rand(1, tokens, cfg.in_channels), rand(1, tokens, cfg.in_channels),
                               rand(1, T5_TOKENS, cfg.joint_attention_dim), rand(1, cfg.pooled_projection_dim))
    ids = dict(img_ids=torch.zeros(tokens, 3, device=device), txt_ids=torch.zeros(T5_TOKENS, 3, device=device),
               guidance=torch.ones(1, device=device, dtype=torch.bfloat16) if cfg.guidance_embeds else None)
    gc.collect()
    empty_cache(device.type)
    reset_peak_memory(ctx.device)
    resident = []

    def step():
        sigma = torch.rand(1, generator=gen).to(device, torch.bfloat16)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = t(hidden_states=(1 - sigma) * x0 + sigma * noise, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=sigma, return_dict=False, **ids)[0]
        torch.nn.functional.mse_loss(pred.float(), (noise - x0).float()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        resident.append(swapper.resident_blocks() if swapper else len(blockswap.blocks_of(t)))

    times = harness.timed_steps(ctx.device, step, WARMUP, STEPS)
    return times, peak_memory_bytes(ctx.device), max(resident)


def encode_phase(ctx, preset, res: int) -> tuple[int, int]:
    """(peak allocated, planned) while the encoders fill the cache: T5, CLIP and the VAE in bf16 on the
    device, one prompt of 512 T5 tokens and one image at `res` encoded, no transformer anywhere."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fluxkit.plan import parse

    device = torch.device(ctx.device.type)
    gc.collect()
    empty_cache(device.type)
    reset_peak_memory(ctx.device)
    before = _allocated(ctx)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device), torch.no_grad():
            t5, clip = T5EncoderModel(T5Config(**preset.t5)), CLIPTextModel(CLIPTextConfig(**preset.clip))
            vae = AutoencoderKL(**preset.vae)
            t5(torch.ones(1, 512, dtype=torch.long))
            clip(torch.ones(1, 77, dtype=torch.long))
            vae.encode(torch.randn(1, 3, res, res)).latent_dist
    finally:
        torch.set_default_dtype(previous)
    measured = peak_memory_bytes(ctx.device) - before
    del t5, clip, vae
    request = parse(["--pretrained_model_name_or_path", preset.name, "--architecture", preset.name, "--lora", "--resolution",
                  str(res), "--train_batch_size", "1", "--mixed_precision", "bf16", "--max_sequence_length", "512"])
    return measured, request.plan(ctx.device.type).phase("encode").bytes


def _rungs(blocks: int) -> list[tuple]:
    """RUNGS with swap counts clipped to a preset of `blocks` blocks; rungs that clip to the same run (a small
    preset has fewer blocks than kohya's counts) are run once, one row naming them all."""
    merged: dict[tuple, tuple] = {}
    for case, rank, quantization, eight_bit, swap, published in RUNGS:
        key = (rank, quantization, eight_bit, min(swap, blocks - 1))
        if key in merged:
            first = merged[key]
            case = f"{first[0]} / {swap}"
            published = f"{first[5]}; {published}"
        merged[key] = (case, *key, published)
    return list(merged.values())


def ladder(ctx, preset, res: int, vae_scale: int, tolerance: float) -> tuple[list, list]:
    """(rows, notes) of the memory ladder; see the module doc."""
    rows, notes = [], []
    device = ctx.device.type
    ctx.log("gpu: memory, the encode phase")
    measured, planned = encode_phase(ctx, preset, res)
    rows.append({"table": "memory ladder (cache full, no encoder on the device)", "case": f"encode phase (T5, CLIP, VAE), {res}x{res}",
                 "params": {"published": "none"},
                 "metrics": {"peak mem GB": measured / 2**30, "planned GB": planned / 2**30,
                             "planned / measured": planned / measured if ctx.device.has_accelerator else "n/a (CPU RSS)"}})
    blocks = preset.transformer["num_layers"] + preset.transformer["num_single_layers"]
    for case, rank, quantization, eight_bit, swap, published in _rungs(blocks):
        ctx.log(f"gpu: memory ladder, {case}")
        before = _allocated(ctx)  # left by earlier work (nothing, after gpu.run freed its models)
        t = _transformer(preset, device, quantization)
        times, measured, resident = _steps(ctx, t, res, vae_scale, rank, eight_bit and ctx.device.has_accelerator, swap)
        planned = _planned(preset.name, res, rank, quantization, eight_bit and ctx.device.has_accelerator, swap, device)
        measured -= before
        metrics = {"s/step": harness.summarize(times), "peak mem GB": measured / 2**30, "planned GB": planned / 2**30,
                   "blocks resident": resident}
        if ctx.device.has_accelerator:
            metrics["planned / measured"] = planned / measured
            metrics[f"within {tolerance:.0%}"] = "yes" if abs(planned / measured - 1) <= tolerance else "NO"
        else:
            metrics["planned / measured"] = "n/a (CPU RSS)"
        rows.append({"table": "memory ladder (cache full, no encoder on the device)",
                     "case": f"{case}, {res}x{res}, batch 1, grad ckpt", "params": {"published": published},
                     "metrics": metrics})
        del t, times
        gc.collect()
        empty_cache(device)
    if not ctx.device.has_accelerator:
        notes.append("memory ladder: on CPU a check of the code path (AdamW instead of 8-bit Adam, swap counts clipped "
                     "to the preset's blocks, rungs that clip alike run once), not a GPU measurement")
    return rows, notes
