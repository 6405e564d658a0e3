"""train-full / train-lora: the toolkit's trainers on the `small` preset, 256x256, batch 2, one
fixed instance prompt; one process and 2-process DeepSpeed ZeRO-2; caching on and off; for LoRA
also int8 and NF4 quantized bases (--base_quantization) beside the unquantized one.

Each case runs the trainer --train_repeats times as a subprocess and reads its JSON summary;
its measured step times (after the trainer's warm-up steps) are the repeats of s/step,
images/s and MFU; the other metrics are per run. MFU is recomputed here from the
summary's s/step with fluxkit.shared.flops, so full and LoRA runs are counted the same way whatever
the trainer reports (its own figure is kept as `trainer mfu`).
"""

from __future__ import annotations

import json
import os

import torch

from fluxkit.shared import flops

from .. import harness

SCRIPTS = {"full": "train_flux_dreambooth.py", "lora": "train_flux_dreambooth_lora.py"}
RESOLUTION = 256
BATCH = 2
INSTANCE_PROMPT = "a photo of sks dog"
T5_TOKENS = 77  # the trainers' default --max_sequence_length
SUMMARY_PREFIX = '{"images_per_sec": '
CASES = [(1, True), (1, False), (2, True), (2, False)]  # (processes, caching)
# LoRA over a quantized frozen base (processes, quantization), cache on; int8 is refused under DeepSpeed
QUANTIZED_CASES = [(1, "int8"), (1, "nf4"), (2, "nf4")]


def _cases(mode: str) -> list[tuple[int, bool, str]]:
    """(processes, caching, base quantization) of every case this suite runs for `mode`."""
    plain = [(processes, cache, "none") for processes, cache in CASES]
    return plain + ([(processes, True, q) for processes, q in QUANTIZED_CASES] if mode == "lora" else [])


def _flags(ctx, mode: str, assets: dict, output_dir: str, cache: bool, quantization: str = "none") -> list[str]:
    flags = ["--pretrained_model_name_or_path", assets["model_path"], "--instance_data_dir", assets["instance_dir"],
             "--instance_prompt", INSTANCE_PROMPT, "--resolution", str(RESOLUTION), "--train_batch_size", str(BATCH),
             "--max_train_steps", str(ctx.args.train_steps), "--throughput_warmup_steps", str(ctx.args.warmup_steps),
             "--learning_rate", "1e-4" if mode == "lora" else "1e-5", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
             "--checkpointing_steps", str(10**9), "--mixed_precision", "bf16", "--seed", "0",
             "--output_dir", output_dir, "--device", ctx.args.device]
    if quantization != "none":
        flags += ["--base_quantization", quantization]
    if not cache:
        flags.append("--no_cache")
    elif mode == "lora":
        flags.append("--cache_latents")  # upstream's LoRA flag; the full trainer caches where exact by default
    return flags


def read_summary(stdout: str, output_dir: str) -> dict:
    """The trainer's summary: OUTPUT_DIR/train_summary.json (it has the per-step times), else its
    JSON line on stdout."""
    path = os.path.join(output_dir, "train_summary.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    lines = [line for line in stdout.splitlines() if line.startswith(SUMMARY_PREFIX)]
    if lines:
        return json.loads(lines[-1])
    raise harness.CommandFailed(f"the trainer printed no summary line and wrote no {path}")


def run(ctx, mode: str) -> dict:
    script = SCRIPTS[mode]
    if not os.path.isfile(os.path.join(harness.ROOT, script)):
        return {"status": "skipped", "reason": f"{script} is not in this checkout"}
    assets = ctx.small_assets()
    geometry = harness.model_geometry(assets["model_path"])
    tokens = flops.image_tokens(RESOLUTION, RESOLUTION, geometry["vae_scale_factor"])

    from tqdm.auto import tqdm

    rows, failures = [], []
    cases = _cases(mode)
    bar = tqdm(total=len(cases) * ctx.args.train_repeats, desc=f"train-{mode}", unit="run")
    for processes, cache, quantization in cases:
        summaries = []
        peak = harness.process_peak_flops(ctx.device, torch.bfloat16, processes)
        for repeat in range(ctx.args.train_repeats):
            base = "" if quantization == "none" else f"-{quantization}"
            name = f"train-{mode}-{processes}p-{'cache' if cache else 'nocache'}{base}-{repeat}"
            out = ctx.path(name)
            cmd = harness.launch_prefix(processes, deepspeed=processes > 1) + [script, *_flags(ctx, mode, assets, out, cache,
                                                                                              quantization)]
            try:
                stdout = harness.run_command(cmd, ctx.path("logs", name + ".log"), env=harness.threads_env(processes),
                                             timeout=ctx.args.timeout)
                summaries.append(read_summary(stdout, out))
            except harness.CommandFailed as err:
                failures.append(f"{name}: {err}")
            bar.update(1)
        if not summaries:
            continue
        # model FLOPs of one optimizer step on one process, from the summary's own batch geometry
        s0 = summaries[0]
        images_per_step = s0["micro_batch"] * s0["world_size"] * s0["grad_accum"]
        step_flops = flops.training_step_flops(geometry["transformer"], tokens, T5_TOKENS,
                                               batch=s0["micro_batch"] * s0["grad_accum"], frozen_base=mode == "lora")
        # every measured step is a repeat when the trainer lists them; else each run's mean step
        steps = [t for s in summaries for t in s.get("step_seconds") or [s["sec_per_step"]] if t]
        metrics = {
            "images/s": harness.summarize(images_per_step / t for t in steps),
            "s/step": harness.summarize(steps),
            "MFU %": harness.summarize(100 * flops.mfu(step_flops, t, peak) for t in steps) if peak else None,
            "peak mem GB/process": harness.summarize(s["peak_memory_gb"] for s in summaries),
            "trainer mfu %": harness.summarize(None if s.get("mfu") is None else 100 * s["mfu"] for s in summaries),
            "final loss": harness.summarize(s["final_loss"] for s in summaries),
            "e2e s": harness.summarize(s["e2e_seconds"] for s in summaries),
        }
        base = "" if quantization == "none" else f", {quantization} base"
        rows.append({"case": f"{processes}p {'DeepSpeed ZeRO-2' if processes > 1 else 'single'}, cache {'on' if cache else 'off'}{base}",
                     "params": {"processes": processes, "cache": "on" if cache else "off", "base quantization": quantization,
                                "global batch": images_per_step, "runs": len(summaries), "measured steps": len(steps)},
                     "metrics": {k: v for k, v in metrics.items() if v is not None}})
    bar.close()

    by_case = {(r["params"]["processes"], r["params"]["cache"]): r["metrics"] for r in rows
               if r["params"]["base quantization"] == "none"}
    comparisons = []
    for processes in (1, 2):
        on, off = by_case.get((processes, "on")), by_case.get((processes, "off"))
        if on and off:
            for metric in ("images/s", "e2e s", "peak mem GB/process"):
                comparisons.append({"name": f"{processes}p: cache on / off", "metric": metric, **harness.compare(off[metric], on[metric])})
    one, two = by_case.get((1, "on")), by_case.get((2, "on"))
    if one and two:
        comparisons.append({"name": "cache on: 2p DeepSpeed / 1p", "metric": "images/s", **harness.compare(one["images/s"], two["images/s"])})

    quantized = {(r["params"]["processes"], r["params"]["base quantization"]): r["metrics"] for r in rows
                 if r["params"]["base quantization"] != "none"}
    for (processes, quantization), metrics in quantized.items():
        plain = by_case.get((processes, "on"))
        if plain:
            for metric in ("images/s", "peak mem GB/process"):
                comparisons.append({"name": f"{processes}p cache on: {quantization} base / unquantized", "metric": metric,
                                    **harness.compare(plain[metric], metrics[metric])})

    notes = [f"small preset, {RESOLUTION}x{RESOLUTION}, batch {BATCH} per process, {ctx.args.train_steps} steps of which "
             f"{ctx.args.warmup_steps} warm-up, bf16; prompt {INSTANCE_PROMPT!r}",
             "MFU: model FLOPs of the transformer (fluxkit.shared.flops; LoRA counts no base weight gradients) per process / "
             f"s/step / that process's peak ({'measured all-core bf16 matmul peak / processes' if ctx.device.type == 'cpu' else 'datasheet'})",
             "peak memory: per process (resident set size on CPU, allocated device memory on accelerators)"]
    return harness.suite_result(rows, comparisons, notes, failures)
