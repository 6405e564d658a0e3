"""startup: a one-step LoRA run end to end, ours beside upstream's script, and where ours spends it.

Every case is started the same way, `accelerate launch --num_processes 1` (no config file, fp32),
on the `small` preset at 256x256, batch 1, one optimizer step, a fresh output folder and (ours) a
fresh latent cache, so both encode the same images and prompt. Cases alternate within each repeat
(floor, ours, upstream, floor, ours, ...) so a change in the host's load hits them alike. Each
case's `cpu s` is the user + system CPU time of its processes (on a shared host it moves far less
than the wall time, which waits for the cores).

- floor: `accelerate launch` of an empty script (interpreter, accelerate's launcher, one child).
- ours: train_flux_dreambooth_lora.py; its summary's `startup_seconds` splits the run into phases
  (fluxkit/training/startup.py); `launch` is the time before the trainer process started, `exit` what
  follows its last mark.
- upstream: diffusers' examples/dreambooth/train_dreambooth_lora_flux.py from --upstream_dir,
  unmodified, through bench/upstream_shim/run_upstream.py (a torchvision stand-in: PyPI's
  torchvision does not import beside this torch). Skipped without --upstream_dir.
"""

from __future__ import annotations

import json
import os
import sys
import time

from .. import harness

UPSTREAM_SCRIPT = "train_dreambooth_lora_flux.py"
RUNNER = os.path.join(harness.ROOT, "bench", "upstream_shim", "run_upstream.py")
RESOLUTION = 256


def launch_command() -> list[str]:
    """`accelerate launch` of one process, no config file, fp32: how every case here and in vs-upstream starts."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]


def _common(assets: dict, out: str) -> list[str]:
    return ["--pretrained_model_name_or_path", assets["model_path"], "--instance_data_dir", assets["instance_dir"],
            "--instance_prompt", "a photo of sks dog", "--resolution", str(RESOLUTION), "--train_batch_size", "1",
            "--max_train_steps", "1", "--output_dir", out, "--seed", "0", "--mixed_precision", "no",
            "--report_to", "tensorboard"]


def _commands(ctx, assets: dict, name: str) -> dict[str, list[str]]:
    empty = ctx.path("empty_script.py")
    if not os.path.isfile(empty):
        with open(empty, "w") as f:
            f.write("")
    cmds = {"floor": launch_command() + [empty],
            "ours": launch_command() + [os.path.join(harness.ROOT, "train_flux_dreambooth_lora.py"),
                                 *_common(assets, ctx.path(name, "ours")), "--latent_cache_dir", ctx.path(name, "cache")]}
    upstream = os.path.join(ctx.args.upstream_dir or "", UPSTREAM_SCRIPT)
    if ctx.args.upstream_dir and os.path.isfile(upstream):
        cmds["upstream"] = launch_command() + [RUNNER, upstream, *_common(assets, ctx.path(name, "upstream"))]
    return cmds


def _our_phases(out: str, began: float, ended: float) -> dict[str, float]:
    with open(os.path.join(out, "train_summary.json")) as f:
        summary = json.load(f)
    phases = {"launch": summary["process_started_at"] - began, **summary["startup_seconds"]}
    phases["exit"] = ended - began - sum(phases.values())
    return phases


def run(ctx) -> dict:
    assets = ctx.small_assets()
    env = {**harness.threads_env(1), "OMP_WAIT_POLICY": "PASSIVE"}
    walls: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}  # user + system CPU seconds of each run's processes
    phases: dict[str, list[float]] = {}
    loads, failures = [], []
    for repeat in range(ctx.args.startup_repeats):
        for case, cmd in _commands(ctx, assets, f"startup-{repeat}").items():
            loads.append(os.getloadavg()[0])
            began, cpu = time.time(), harness.children_cpu_seconds()
            try:
                harness.run_command(cmd, ctx.path("logs", f"startup-{case}-{repeat}.log"), env=env, timeout=ctx.args.timeout)
            except harness.CommandFailed as err:
                failures.append(f"{case} #{repeat}: {err}")
                continue
            ended = time.time()
            walls.setdefault(case, []).append(ended - began)
            cpus.setdefault(case, []).append(harness.children_cpu_seconds() - cpu)
            if case == "ours":
                for phase, seconds in _our_phases(ctx.path(f"startup-{repeat}", "ours"), began, ended).items():
                    phases.setdefault(phase, []).append(seconds)
    rows = [{"case": case, "params": {"runs": len(values)},
             "metrics": {"e2e s": harness.summarize(values), "cpu s": harness.summarize(cpus[case])}}
            for case, values in walls.items()]
    if phases:
        rows.append({"case": "ours, by phase", "params": {"runs": len(walls.get("ours", []))},
                     "metrics": {f"{p} s": harness.summarize(v) for p, v in phases.items()}})
    comparisons = []
    if "ours" in walls and "upstream" in walls:
        for metric, values in (("e2e s", walls), ("cpu s", cpus)):
            comparisons.append({"name": "1-step LoRA run: ours / upstream", "metric": metric,
                                **harness.compare(harness.summarize(values["upstream"]), harness.summarize(values["ours"]))})
    notes = [f"small preset, {RESOLUTION}x{RESOLUTION}, batch 1, 1 step, fp32, accelerate launch --num_processes 1, "
             f"OMP_WAIT_POLICY=PASSIVE, {harness.threads_env(1)['OMP_NUM_THREADS']} OpenMP threads; "
             f"{ctx.args.startup_repeats} alternating repeat(s); 1-minute load average at each start: "
             + ", ".join(f"{x:.1f}" for x in loads)]
    if "upstream" not in walls and not failures:
        notes.append(f"upstream skipped: pass --upstream_dir DIR holding diffusers' examples/dreambooth/{UPSTREAM_SCRIPT}")
    return harness.suite_result(rows, comparisons, notes, failures)
