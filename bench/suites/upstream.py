"""vs-upstream: our trainers beside diffusers' own FLUX DreamBooth scripts, full and LoRA, end to end.

Same model (the `small` preset), same flags (`--vs_upstream_flags` adds more to both), each started the same way (`accelerate launch
--num_processes 1`, fp32), 256x256, batch 2, `--speed_steps` optimizer steps (default 100), a fresh
output folder and (ours) a fresh latent cache. LoRA passes upstream's `--cache_latents` to both; the
full fine-tune has no such flag upstream (its script encodes every batch), ours caches by default.
`cpu s` is the user + system CPU time of each run's processes: on a shared host it moves far less
than the wall time. Both run with the cores as OpenMP threads and the OpenMP wait the bench chose
for itself when it started (fluxkit.shared.host_runtime: by the host's load then) or found set, so
a host's load at one run's start (the previous run's, too) never gives the two different waits.

MFU % (without --vs_upstream_flags, which may change the arithmetic) is each step's model FLOPs
(fluxkit.shared.flops: LoRA counts no base weight gradients; LoRA's 512 T5 tokens, the full
fine-tune's 77, both scripts' defaults) over this host's measured fp32 matmul peak. The "fp32 peak"
row is the s/step of a step run at that peak: upstream's s/step over it is the most any trainer
doing the same transformer arithmetic in fp32 could gain per step on this host.
Cases alternate within each repeat (ours, upstream, ours, upstream) so a change in the host's load
hits both alike.

s/step is read the same way for both scripts: from the elapsed time their tqdm step bars print
(1 s resolution), between the end of step WARMUP and the last step, divided by the steps between.
Upstream's scripts run unmodified through bench/upstream_shim/run_upstream.py; the suite is
skipped without --upstream_dir (a folder holding train_dreambooth_flux.py and
train_dreambooth_lora_flux.py from diffusers' examples/dreambooth).
"""

from __future__ import annotations

import os
import re
import shlex
import time

import torch

from fluxkit.shared import flops

from .. import harness
from .startup import RUNNER, launch_command

SCRIPTS = {"full": ("train_flux_dreambooth.py", "train_dreambooth_flux.py"),
           "lora": ("train_flux_dreambooth_lora.py", "train_dreambooth_lora_flux.py")}
RESOLUTION = 256
BATCH = 2
WARMUP = 2  # steps left out of s/step
T5_TOKENS = {"full": 77, "lora": 512}  # both scripts' --max_sequence_length defaults
# the step bar of either script (ours "steps:", upstream's "Steps:"): "... n/total [[h:]mm:ss<"
_BAR = re.compile(r"(?i)\bsteps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<")


def bar_seconds_per_step(log: str, warmup: int = WARMUP) -> float | None:
    """Mean seconds per step after `warmup` steps, from a tqdm step bar's elapsed times in `log`."""
    first_seen: dict[int, int] = {}
    total = None
    for match in _BAR.finditer(log):
        n, total = int(match.group(1)), int(match.group(2))
        elapsed = int(match.group(3) or 0) * 3600 + int(match.group(4)) * 60 + int(match.group(5))
        first_seen.setdefault(n, elapsed)
    if total is None or total not in first_seen or warmup not in first_seen or total <= warmup:
        return None
    return (first_seen[total] - first_seen[warmup]) / (total - warmup)


def _flags(ctx, assets: dict, mode: str, out: str) -> list[str]:
    flags = ["--pretrained_model_name_or_path", assets["model_path"], "--instance_data_dir", assets["instance_dir"],
             "--instance_prompt", "a photo of sks dog", "--resolution", str(RESOLUTION), "--train_batch_size", str(BATCH),
             "--max_train_steps", str(ctx.args.speed_steps), "--learning_rate", "1e-4" if mode == "lora" else "1e-5",
             "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--checkpointing_steps", str(10**9),
             "--output_dir", out, "--seed", "0", "--mixed_precision", "no", "--report_to", "tensorboard"]
    return flags + (["--cache_latents"] if mode == "lora" else []) + shlex.split(ctx.args.vs_upstream_flags)


def _commands(ctx, assets: dict, mode: str, repeat: int) -> dict[str, list[str]]:
    ours, theirs = SCRIPTS[mode]
    name = f"vs-upstream-{mode}-{repeat}"
    return {"ours": launch_command() + [os.path.join(harness.ROOT, ours), *_flags(ctx, assets, mode, ctx.path(name, "ours")),
                                        "--latent_cache_dir", ctx.path(name, "cache")],
            "upstream": launch_command() + [RUNNER, os.path.join(ctx.args.upstream_dir, theirs),
                                            *_flags(ctx, assets, mode, ctx.path(name, "upstream"))]}


def run(ctx) -> dict:
    missing = [s for _, s in SCRIPTS.values() if not os.path.isfile(os.path.join(ctx.args.upstream_dir or "", s))]
    if not ctx.args.upstream_dir or missing:
        return {"status": "skipped", "reason": f"pass --upstream_dir DIR holding diffusers' examples/dreambooth/{missing[0]}"}
    assets = ctx.small_assets()
    env = harness.threads_env(1)
    # measured (or read from its cache) before any run, so the runs never share the CPU with it; not
    # with --vs_upstream_flags, which may change the arithmetic (--allow_tf32, --mixed_precision bf16)
    peak = None if ctx.args.vs_upstream_flags else harness.process_peak_flops(ctx.device, torch.float32, 1)
    transformer = harness.model_geometry(assets["model_path"])["transformer"]
    step_flops = {mode: flops.training_step_flops(transformer, flops.image_tokens(RESOLUTION, RESOLUTION), T5_TOKENS[mode],
                                                  batch=BATCH, frozen_base=mode == "lora") for mode in SCRIPTS}
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    loads, failures = [], []
    for repeat in range(ctx.args.startup_repeats):
        for mode in SCRIPTS:
            for who, cmd in _commands(ctx, assets, mode, repeat).items():
                loads.append(os.getloadavg()[0])
                log = ctx.path("logs", f"vs-upstream-{mode}-{who}-{repeat}.log")
                began, cpu = time.time(), harness.children_cpu_seconds()
                try:
                    harness.run_command(cmd, log, env=env, timeout=ctx.args.timeout)
                except harness.CommandFailed as err:
                    failures.append(f"{mode} {who} #{repeat}: {err}")
                    continue
                with open(log, errors="replace") as f:
                    per_step = bar_seconds_per_step(f.read())
                cell = results.setdefault((mode, who), {"e2e s": [], "cpu s": [], "s/step": []})
                cell["e2e s"].append(time.time() - began)
                cell["cpu s"].append(harness.children_cpu_seconds() - cpu)
                cell["s/step"].append(per_step)
    for (mode, _), cell in results.items():
        cell["MFU %"] = [100 * flops.mfu(step_flops[mode], t, peak) if t and peak else None for t in cell["s/step"]]
    rows = [{"case": f"{mode}: {who}", "params": {"runs": len(cell["e2e s"]), "steps": ctx.args.speed_steps},
             "metrics": {k: harness.summarize(v) for k, v in cell.items()}} for (mode, who), cell in results.items()]
    ideal = {mode: step_flops[mode] / peak for mode in SCRIPTS} if peak else {}
    rows += [{"case": f"{mode}: fp32 peak", "params": {"GFLOP/step": round(step_flops[mode] / 1e9, 2)},
              "metrics": {"s/step": harness.summarize([seconds]), "MFU %": harness.summarize([100.0])}}
             for mode, seconds in ideal.items()]
    comparisons = [{"name": f"{mode}: ours / upstream ({metric}; speed-up = 1 / ratio)", "metric": metric,
                    **harness.compare(harness.summarize(results[(mode, "upstream")][metric]),
                                      harness.summarize(results[(mode, "ours")][metric]))}
                   for mode in SCRIPTS for metric in ("e2e s", "cpu s", "s/step")
                   if (mode, "ours") in results and (mode, "upstream") in results]
    comparisons += [{"name": f"{mode}: fp32 peak / upstream (s/step; 1 / ratio = the most any trainer could gain per step "
                             "doing the same transformer arithmetic in fp32)", "metric": "s/step",
                     **harness.compare(harness.summarize(results[(mode, "upstream")]["s/step"]), harness.summarize([ideal[mode]]))}
                    for mode in ideal if (mode, "upstream") in results]
    extra = f", then both with {ctx.args.vs_upstream_flags} (the later flag wins)" if ctx.args.vs_upstream_flags else ""
    notes = [f"small preset, {RESOLUTION}x{RESOLUTION}, batch {BATCH}, {ctx.args.speed_steps} steps, --mixed_precision no{extra}, accelerate launch "
             f"--num_processes 1, {env['OMP_NUM_THREADS']} OpenMP threads, OMP_WAIT_POLICY="
             f"{os.environ.get('OMP_WAIT_POLICY') or 'unset'} GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT') or 'unset'}; s/step after {WARMUP} "
             f"warm-up steps from each script's tqdm bar; {ctx.args.startup_repeats} alternating repeat(s); 1-minute load "
             "average at each start: " + ", ".join(f"{x:.1f}" for x in loads),
             f"MFU against this host's fp32 matmul peak, {peak / 1e9:.0f} GFLOP/s" if peak else
             "no MFU: --vs_upstream_flags may change the arithmetic" if ctx.args.vs_upstream_flags else "no MFU: no fp32 peak for this device"]
    return harness.suite_result(rows, comparisons, notes, failures)
