"""gpu: FLUX.1-dev's architecture with random bf16 weights on one accelerator (CUDA or NPU).

1. the device's measured bf16 matmul peak (the MFU denominator) beside its datasheet figure;
2. a LoRA rank-16 training step at 512x512, batch 1, with and without gradient checkpointing, as the LoRA
   trainer runs it (fp32 adapters, bf16 autocast, every encoder resident): s/step, MFU, and
   torch.cuda's (or torch.npu's) peak allocated memory beside fluxkit.plan's planned peak for the
   same run: the ratio planned / measured, and whether it is within PLAN_TOLERANCE (issue 15's 10%);
2b. the memory ladder (bench/suites/gpu_memory.py): bf16 LoRA, the HF QLoRA recipe and block offload
   (16 / 22 / 28 blocks swapped) once the cache is full, each beside the plan's training peak;
2c. the other families (bench/suites/gpu_families.py): Kontext editing, FLUX.2 [klein] 4B and FLUX.2 [dev]
   LoRA steps at 1024x1024 as the trainer runs them (images/s, MFU, peak memory beside the plan's);
3. 1024x1024, 28-step text-to-image through FluxPipeline: s/image and transformer it/s, eager
   and torch.compile'd;
4. the same image split over every accelerator here with Ulysses context parallelism
   (--ulysses_degree = all devices, bench/suites/gpu_cp.py under accelerate launch): s/image
   (anchor: xDiT, 1.63 s on 4 x H100). Needs 2 or more devices; on CPU with a small preset it
   runs over 2 gloo processes to check the code path.

Everything is built in device memory from configs (fluxkit.tiny.build's `dev` preset), nothing is
read from disk or a hub; the whole suite is sized to fit in 10 minutes on an H100-class GPU.
Without an accelerator it skips, unless --gpu_preset names a small preset to try the same
code on CPU.
"""

from __future__ import annotations

import gc
import json
import os
import time

import torch

from fluxkit.shared import flops
from fluxkit.shared.device import empty_cache, peak_memory_bytes, reset_peak_memory, synchronize

from .. import harness
from . import gpu_families, gpu_memory

TRAIN_WARMUP, TRAIN_STEPS = 3, 8
INFER_STEPS, INFER_REPEATS = 28, 3
LORA_RANK = 16
LORA_CHECKPOINTING = (True, False)  # the LoRA step with gradient checkpointing on, then off
PLAN_TOLERANCE = 0.10  # the plan within 10% of the device's measured peak
T5_TRAIN_TOKENS = 77  # the trainers' default --max_sequence_length
T5_INFER_TOKENS = 512  # FluxPipeline's default
TARGET_LORA_MFU = 0.40
TARGET_COMPILED_S_PER_IMAGE = 4.3  # xDiT's published H100 figure for FLUX.1-dev 1024x1024, 28 steps
XDIT_ULYSSES_4_H100_S = 1.63  # xDiT's FLUX.1-dev 1024x1024 28 steps over 4 x H100 (sequence parallel)


def _sizes(preset) -> dict:
    if preset.name == "dev":
        return {"train": 512, "infer": 1024, "peak_matmul": 8192, "peak_seconds": 2.0}
    return {"train": preset.sample_resolution, "infer": preset.sample_resolution, "peak_matmul": 1024, "peak_seconds": 0.5}


def _build(preset, device):
    """The pipeline's models with random weights, made directly on the device in bf16."""
    from fluxkit.tiny.build import build_models

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            return build_models(preset)
    finally:
        torch.set_default_dtype(previous)


def _lora_step(ctx, transformer, res: int, vae_scale: int, checkpointing: bool) -> tuple[dict, dict]:
    from peft import LoraConfig

    from fluxkit.families.flux1 import FAMILY as FLUX1

    device = next(transformer.parameters()).device
    cfg = transformer.config
    tokens = flops.image_tokens(res, res, vae_scale)
    transformer.requires_grad_(False)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                       target_modules=list(FLUX1.lora_targets)))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:  # as the LoRA trainer runs: fp32 adapters over the bf16 base, under bf16 autocast
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, torch.bfloat16)

    latents, noise = rand(1, tokens, cfg.in_channels), rand(1, tokens, cfg.in_channels)
    text, pooled = rand(1, T5_TRAIN_TOKENS, cfg.joint_attention_dim), rand(1, cfg.pooled_projection_dim)
    img_ids = torch.zeros(tokens, 3, device=device)
    txt_ids = torch.zeros(T5_TRAIN_TOKENS, 3, device=device)
    guidance = torch.full((1,), 1.0, device=device, dtype=torch.bfloat16) if cfg.guidance_embeds else None

    def step():
        sigma = torch.rand(1, generator=gen).to(device, torch.bfloat16)
        noisy = (1 - sigma) * latents + sigma * noise  # rectified flow: predict noise - latents
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = transformer(hidden_states=noisy, encoder_hidden_states=text, pooled_projections=pooled, timestep=sigma,
                               guidance=guidance, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak_memory(ctx.device)
    times = harness.timed_steps(ctx.device, step, TRAIN_WARMUP, TRAIN_STEPS)
    measured = peak_memory_bytes(ctx.device)
    planned = _planned_peak(ctx, res, checkpointing)
    metrics = {"s/step": harness.summarize(times), "peak mem GB": measured / 2**30, "planned GB": planned / 2**30}
    if ctx.device.has_accelerator:
        metrics["planned / measured"] = planned / measured
        metrics[f"within {PLAN_TOLERANCE:.0%}"] = "yes" if abs(planned / measured - 1) <= PLAN_TOLERANCE else "NO"
    else:  # the peak is the whole process's RSS (libraries, the inference pipeline's tokenizers, ...)
        metrics["planned / measured"] = "n/a (CPU RSS)"
    step_flops = flops.training_step_flops(cfg, tokens, T5_TRAIN_TOKENS, batch=1, frozen_base=True)
    # back to the plain model (for the next case and for inference)
    del opt, params
    transformer.unload_lora()
    if checkpointing:
        transformer.disable_gradient_checkpointing()
    return metrics, {"step_flops": step_flops, "times": times, "tokens": tokens, "planned": planned, "measured": measured}


def _planned_peak(ctx, res: int, checkpointing: bool) -> int:
    """fluxkit.plan's peak for this step: every component resident in bf16, no caches, one process."""
    from fluxkit.plan import parse

    request = parse([
        "--pretrained_model_name_or_path", ctx.args.gpu_preset, "--architecture", ctx.args.gpu_preset, "--lora",
        "--rank", str(LORA_RANK), "--lora_alpha", str(LORA_RANK), "--resolution", str(res), "--train_batch_size", "1",
        "--mixed_precision", "bf16", "--max_sequence_length", str(T5_TRAIN_TOKENS)]
        + (["--gradient_checkpointing", "--no_cache"] if checkpointing else ["--no_cache"]))
    # --no_cache: the plan keeps every encoder on the device through training, as this step does
    plan = request.plan(ctx.device.type)
    return max(p.bytes for p in plan.phases if p.name.startswith("train"))


def _infer(ctx, pipe, res: int, compiled: bool) -> dict:
    stamps: list[float] = []

    def on_step_end(_pipe, _i, _t, kwargs):
        synchronize(ctx.device)
        stamps.append(time.perf_counter())
        return kwargs

    def generate(steps: int, callback=None):
        return pipe(prompt="a photo of sks dog", height=res, width=res, num_inference_steps=steps, guidance_scale=3.5,
                    max_sequence_length=T5_INFER_TOKENS, generator=torch.Generator("cpu").manual_seed(0),
                    callback_on_step_end=callback, output_type="pil")

    if compiled:
        pipe.transformer.compile()
    synchronize(ctx.device)
    start = time.perf_counter()
    generate(2)  # warm-up: kernels, allocator, and on the compiled run the compilation itself
    synchronize(ctx.device)
    warmup = time.perf_counter() - start
    reset_peak_memory(ctx.device)
    per_image, step_times = [], []
    for _ in range(INFER_REPEATS):
        stamps.clear()
        synchronize(ctx.device)
        start = time.perf_counter()
        stamps.append(start)
        generate(INFER_STEPS, on_step_end)
        synchronize(ctx.device)
        per_image.append(time.perf_counter() - start)
        # step k's time is stamp k - stamp k-1; the first includes text encoding, so it is dropped
        step_times += [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return {"s/image": harness.summarize(per_image), "transformer it/s": harness.summarize(1 / t for t in step_times),
            "peak mem GB": peak_memory_bytes(ctx.device) / 2**30, "warm-up s": warmup}


def _context_parallel(ctx, preset, res: int) -> tuple[dict | None, str]:
    """(row, note): one image over every device with --ulysses_degree = device count."""
    if ctx.device.has_accelerator:
        processes = ctx.device.count
        if processes < 2:
            return None, f"context parallel: skipped, 1 {ctx.device.type} device here (it needs 2 or more)"
    elif preset.large:
        return None, "context parallel: skipped, no accelerator"
    else:
        processes = 2  # gloo on CPU: the code path, not a measurement
    out = ctx.path("gpu-context-parallel.json")
    cmd = harness.launch_prefix(processes) + [os.path.join(harness.ROOT, "bench", "suites", "gpu_cp.py"),
                                              "--preset", preset.name, "--resolution", str(res), "--steps", str(INFER_STEPS),
                                              "--repeats", str(INFER_REPEATS), "--out", out]
    ctx.log(f"gpu: {res}x{res} inference, ulysses {processes} over {processes} processes")
    try:
        harness.run_command(cmd, ctx.path("logs", "gpu-context-parallel.log"),
                            env=None if ctx.device.has_accelerator else harness.threads_env(processes), timeout=ctx.args.timeout)
        with open(out, encoding="utf-8") as f:
            result = json.load(f)
    except (harness.CommandFailed, OSError, ValueError) as err:
        return None, f"context parallel: failed ({err})"
    row = {"table": "text-to-image", "case": f"{res}x{res}, {INFER_STEPS} steps, ulysses {processes}",
           "params": {"T5 tokens": T5_INFER_TOKENS, "ulysses_degree": processes, "attention backend": result["attention_backend"]},
           "metrics": {"s/image": harness.summarize(result["s/image"]), "warm-up s": result["warm-up s"]}}
    s = row["metrics"]["s/image"]["median"]
    anchor = (f"xDiT: {XDIT_ULYSSES_4_H100_S} s on 4 x H100" if preset.large
              else "a check of the code path over gloo, not a measurement")
    return row, f"context parallel: ulysses {processes}, {s:.2f} s/image ({anchor})"


def run(ctx) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from fluxkit.tiny.build import SCHEDULER_CONFIG, build_clip_tokenizer, build_t5_tokenizer, resolve_preset

    preset = resolve_preset(ctx.args.gpu_preset)
    if not ctx.device.has_accelerator and preset.large:
        return {"status": "skipped", "reason": "no accelerator (CUDA GPU or Ascend NPU) on this host; run `python -m bench gpu` "
                                               "on one (FLUX.1-dev in bf16 needs about 60 GB), or try the code path on CPU "
                                               "with `--gpu_preset tiny`"}
    sizes = _sizes(preset)
    device = ctx.device.type
    rows, notes = [], []

    measured_peak = flops.measure_matmul_peak(device, torch.bfloat16, size=sizes["peak_matmul"], seconds=sizes["peak_seconds"])
    datasheet = flops.peak_flops(ctx.device, torch.bfloat16) if ctx.device.has_accelerator else None
    rows.append({"table": "device", "case": f"bf16 matmul {sizes['peak_matmul']}^3", "params": {},
                 "metrics": {"measured TFLOP/s": measured_peak / 1e12,
                             "datasheet TFLOP/s": None if datasheet is None else datasheet / 1e12}})

    ctx.log(f"gpu: building {preset.name} with random bf16 weights on {device}")
    models = _build(preset, device)
    vae_scale = 2 ** (len(models["vae"].config.block_out_channels) - 1)
    plan_checks = []
    for checkpointing in LORA_CHECKPOINTING:
        train_metrics, train = _lora_step(ctx, models["transformer"], sizes["train"], vae_scale, checkpointing)
        step_flops = train["step_flops"]
        train_metrics["MFU % (measured peak)"] = harness.summarize(100 * flops.mfu(step_flops, t, measured_peak)
                                                                   for t in train["times"])
        if datasheet:
            train_metrics["MFU % (datasheet)"] = harness.summarize(100 * flops.mfu(step_flops, t, datasheet) for t in train["times"])
        case = f"LoRA r{LORA_RANK}, {sizes['train']}x{sizes['train']}, batch 1, grad ckpt {'on' if checkpointing else 'off'}"
        rows.append({"table": "LoRA training step", "case": case,
                     "params": {"image tokens": train["tokens"], "T5 tokens": T5_TRAIN_TOKENS}, "metrics": train_metrics})
        plan_checks.append((case, train["planned"], train["measured"]))
        if checkpointing:
            lora_mfu = train_metrics["MFU % (measured peak)"]["median"] / 100
        gc.collect()

    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), tokenizer=build_clip_tokenizer(preset.clip_vocab),
                        tokenizer_2=build_t5_tokenizer(preset.t5_vocab), **models)
    pipe.set_progress_bar_config(disable=True)
    modes = ["eager"] + (["compiled"] if ctx.args.gpu_compile == "on" else [])
    infer_rows = {}
    for mode in modes:
        ctx.log(f"gpu: {sizes['infer']}x{sizes['infer']} inference, {mode}")
        infer_rows[mode] = {"table": "text-to-image", "case": f"{sizes['infer']}x{sizes['infer']}, {INFER_STEPS} steps, {mode}",
                            "params": {"T5 tokens": T5_INFER_TOKENS},
                            "metrics": _infer(ctx, pipe, sizes["infer"], mode == "compiled")}
        rows.append(infer_rows[mode])

    eager = infer_rows["eager"]["metrics"]["s/image"]
    comparisons = []
    if "compiled" in infer_rows:
        comparisons.append({"name": "compiled / eager", "metric": "s/image",
                            **harness.compare(eager, infer_rows["compiled"]["metrics"]["s/image"])})
    del pipe, models  # the memory ladder and the context-parallel processes need the device memory
    gc.collect()
    empty_cache(device)
    ladder_rows, ladder_notes = gpu_memory.ladder(ctx, preset, sizes["train"], vae_scale, PLAN_TOLERANCE)
    rows += ladder_rows
    notes += ladder_notes
    family_rows, family_notes = gpu_families.cases(ctx, preset, measured_peak, PLAN_TOLERANCE)
    rows += family_rows
    notes += family_notes
    cp_row, cp_note = _context_parallel(ctx, preset, sizes["infer"])
    notes.append(cp_note)
    if cp_row:
        rows.append(cp_row)
        comparisons.append({"name": f"ulysses {cp_row['params']['ulysses_degree']} / 1 device (eager)", "metric": "s/image",
                            **harness.compare(eager, cp_row["metrics"]["s/image"])})
    if ctx.device.has_accelerator:
        for case, planned, measured in plan_checks:
            notes.append(f"target: the memory plan within {PLAN_TOLERANCE:.0%} of {ctx.device.type}'s peak allocated memory "
                         f"({case}): {'met' if abs(planned / measured - 1) <= PLAN_TOLERANCE else 'NOT met'} "
                         f"(planned {planned / 2**30:.2f} GiB / measured {measured / 2**30:.2f} GiB = {planned / measured:.3f})")
    else:
        notes.append("memory plan vs measured: not judged on CPU (the peak there is the whole process's RSS); "
                     "bench's memory suite compares the plan with the trainers on CPU")
    if preset.large:
        mfu = lora_mfu
        notes.append(f"target: LoRA step MFU >= {TARGET_LORA_MFU:.0%} of the measured peak: "
                     f"{'met' if mfu >= TARGET_LORA_MFU else 'NOT met'} ({mfu:.1%})")
        if "compiled" in modes:
            s = infer_rows["compiled"]["metrics"]["s/image"]["median"]
            notes.append(f"target: compiled 1024x1024 28 steps under {TARGET_COMPILED_S_PER_IMAGE} s/image (xDiT, H100): "
                         f"{'met' if s < TARGET_COMPILED_S_PER_IMAGE else 'NOT met'} ({s:.2f} s)")
    else:
        notes.append(f"preset {preset.name} on {device}: a check of the code path, not a GPU measurement")
    notes.append("MFU counts LoRA as a frozen-base step (fluxkit.shared.flops); text encoders and VAE run inside s/image, "
                 "transformer it/s is the time between step ends (first step, with text encoding, left out)")
    return {"status": "ok", "rows": rows, "comparisons": comparisons, "notes": notes}
