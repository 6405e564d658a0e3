"""vs-upstream: our trainers beside diffusers' own FLUX DreamBooth scripts, full and LoRA, end to end.

Same model (the `small` preset), same flags (`--vs_upstream_flags` adds more to both), each started the same way (`accelerate launch
--num_processes 1`, fp32), 256x256, batch 2, `--speed_steps` optimizer steps (default 100), a fresh
output folder and (ours) a fresh latent cache. LoRA passes upstream's `--cache_latents` to both; the
full fine-tune has no such flag upstream (its script encodes every batch), ours caches by default.
`cpu s` is the user + system CPU time of each run's processes: on a shared host it moves far less
than the wall time.
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

from .. import harness
from .startup import RUNNER, launch_command

SCRIPTS = {"full": ("train_flux_dreambooth.py", "train_dreambooth_flux.py"),
           "lora": ("train_flux_dreambooth_lora.py", "train_dreambooth_lora_flux.py")}
RESOLUTION = 256
BATCH = 2
WARMUP = 2  # steps left out of s/step
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
    env = {**harness.threads_env(1), "OMP_WAIT_POLICY": "PASSIVE"}
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
    rows = [{"case": f"{mode}: {who}", "params": {"runs": len(cell["e2e s"]), "steps": ctx.args.speed_steps},
             "metrics": {k: harness.summarize(v) for k, v in cell.items()}} for (mode, who), cell in results.items()]
    comparisons = [{"name": f"{mode}: ours / upstream ({metric}; speed-up = 1 / ratio)", "metric": metric,
                    **harness.compare(harness.summarize(results[(mode, "upstream")][metric]),
                                      harness.summarize(results[(mode, "ours")][metric]))}
                   for mode in SCRIPTS for metric in ("e2e s", "cpu s", "s/step")
                   if (mode, "ours") in results and (mode, "upstream") in results]
    extra = f", both with {ctx.args.vs_upstream_flags}" if ctx.args.vs_upstream_flags else ""
    notes = [f"small preset, {RESOLUTION}x{RESOLUTION}, batch {BATCH}, {ctx.args.speed_steps} steps, fp32{extra}, accelerate launch "
             f"--num_processes 1, OMP_WAIT_POLICY=PASSIVE, {env['OMP_NUM_THREADS']} OpenMP threads; s/step after {WARMUP} "
             f"warm-up steps from each script's tqdm bar; {ctx.args.startup_repeats} alternating repeat(s); 1-minute load "
             "average at each start: " + ", ".join(f"{x:.1f}" for x in loads)]
    return harness.suite_result(rows, comparisons, notes, failures)
