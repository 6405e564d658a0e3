"""memory: the memory plan (fluxkit.plan) against measured peaks of the real trainers on CPU.

Each case runs a trainer on the `small` preset for 3 steps under bench.memprobe, which reports
the highest resident anonymous memory between accelerator.prepare() and the last optimizer
step minus the process's own after its libraries were imported and their kernels warmed
(the "loaded process"). That delta is compared with the plan's per-device peak for the same
flags (device cpu). Cases: LoRA/full, batch 1/4, gradient checkpointing on/off, and 2-process
DeepSpeed ZeRO-2. The first case, the tiny preset at 32 px (almost no data), shows the CPU
runtime's own lasting allocations that the plan adds as a constant (fluxkit.plan.CPU_RUNTIME_BYTES).
"""

from __future__ import annotations

import json
import os

from .. import harness

SCRIPTS = {"full": "train_flux_dreambooth.py", "lora": "train_flux_dreambooth_lora.py"}
STEPS = 3
TOLERANCE = 0.15  # the plan must be within 15% of the measured peak
# (name, preset, mode, resolution, batch, checkpointing, processes)
CASES = [
    ("tiny runtime floor", "tiny", "lora", 32, 1, False, 1),
    ("LoRA b1", "small", "lora", 256, 1, False, 1),
    ("LoRA b4", "small", "lora", 256, 4, False, 1),
    ("LoRA b4 ckpt", "small", "lora", 256, 4, True, 1),
    ("LoRA b4 512px", "small", "lora", 512, 4, False, 1),
    ("full b1", "small", "full", 256, 1, False, 1),
    ("full b4", "small", "full", 256, 4, False, 1),
    ("full b4 ckpt", "small", "full", 256, 4, True, 1),
    ("full b4 ZeRO-2 2p", "small", "full", 256, 4, False, 2),
    ("LoRA b4 ZeRO-2 2p", "small", "lora", 256, 4, False, 2),
]
PROBE_ENV = {
    # glibc returns freed blocks of 64 KiB and more to the system at once: RSS follows live memory
    "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
}


def trainer_flags(model: str, instance_dir: str, out: str, mode: str, resolution: int, batch: int, checkpointing: bool) -> list[str]:
    flags = ["--pretrained_model_name_or_path", model, "--instance_data_dir", instance_dir,
             "--instance_prompt", "a photo of sks dog", "--resolution", str(resolution), "--train_batch_size", str(batch),
             "--max_train_steps", str(STEPS), "--checkpointing_steps", str(10**9), "--mixed_precision", "bf16",
             "--seed", "0", "--output_dir", out, "--report_to", "none", "--device", "cpu", "--lr_warmup_steps", "0",
             "--overwrite_output_dir"]  # a reused --work_dir: the previous bench run moves aside
    return flags + (["--gradient_checkpointing"] if checkpointing else [])


def planned_bytes(flags: list[str], mode: str, processes: int) -> int:
    """The plan's training peak (forward + backward or the optimizer step, whichever is larger): the
    phases between accelerator.prepare() and the last step, which is what memprobe's loop window sees."""
    from fluxkit.plan import plan_memory
    from fluxkit.train_args import parse_args

    args = parse_args(flags, lora=mode == "lora")
    plan = plan_memory(args, processes, 2 if processes > 1 else 0, "cpu")
    return max(p.bytes for p in plan.phases if p.name.startswith("train"))


def measure(ctx, name: str, script: str, flags: list[str], processes: int) -> int:
    """Highest measured delta over the ranks (bytes)."""
    out_prefix = ctx.path("memory", name.replace(" ", "_"))
    os.makedirs(os.path.dirname(out_prefix), exist_ok=True)
    cmd = harness.launch_prefix(processes, deepspeed=processes > 1) + ["-m", "bench.memprobe", out_prefix, script, *flags]
    env = {**harness.threads_env(processes), **PROBE_ENV}
    harness.run_command(cmd, ctx.path("logs", f"memory-{name.replace(' ', '_')}.log"), env=env, timeout=ctx.args.timeout)
    deltas = []
    for rank in range(processes):
        with open(f"{out_prefix}.rank{rank}.json") as f:
            r = json.load(f)
        deltas.append(r["loop_peak_bytes"] - r["baseline_bytes"])
    return max(deltas)


def run(ctx) -> dict:
    from fluxkit.tiny import build_datasets, build_pipeline

    small = ctx.small_assets()
    tiny_model, tiny_data = ctx.path("tiny_flux"), ctx.path("tiny_data")
    if not os.path.isdir(tiny_model):
        build_pipeline(tiny_model, "tiny", seed=0)
    if not os.path.isdir(tiny_data):
        build_datasets(tiny_data, seed=0, resolution=32)
    rows, failures = [], []
    for name, preset, mode, res, batch, ckpt, processes in CASES:
        model, instance = ((small["model_path"], small["instance_dir"]) if preset == "small"
                           else (tiny_model, os.path.join(tiny_data, "instance")))
        out = ctx.path("memory", name.replace(" ", "_") + "-out")
        flags = trainer_flags(model, instance, out, mode, res, batch, ckpt)
        if processes > 1:  # 4 sample images: every process needs a whole micro batch of its own
            flags += ["--repeats", str(processes)]
        ctx.log(f"memory: {name}")
        try:
            measured = measure(ctx, name, SCRIPTS[mode], flags, processes)
        except (harness.CommandFailed, OSError, ValueError) as err:
            failures.append(f"{name}: {err}")
            continue
        planned = planned_bytes(flags, mode, processes)
        error = planned / measured - 1
        floor = preset == "tiny"  # almost no data: this row measures the runtime, not the plan
        rows.append({"case": name, "params": {"preset": preset, "mode": mode, "px": res, "batch": batch,
                                              "ckpt": "on" if ckpt else "off", "processes": processes},
                     "metrics": {"planned MiB": planned / 2**20, "measured MiB": measured / 2**20,
                                 "plan error %": 100 * error,
                                 "within 15%": "n/a (floor)" if floor else ("yes" if abs(error) <= TOLERANCE else "NO")}})
    notes = [f"{STEPS} optimizer steps, bf16 mixed precision, CPU; measured = peak resident anonymous memory from "
             "accelerator.prepare() to the last step minus the loaded, warmed process's (bench/memprobe.py); "
             "2-process rows: the larger rank",
             "planned = fluxkit.plan.plan_memory(trainer flags, processes, ZeRO stage, 'cpu').peak_bytes"]
    return harness.suite_result(rows, [], notes, failures)
