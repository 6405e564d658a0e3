"""memory: the memory plan (fluxkit.plan) against measured peaks of the real trainers on CPU.

Each case runs a trainer on the `small` preset for 3 steps under bench.memprobe, which reports
the highest resident anonymous memory between accelerator.prepare() and the last optimizer
step minus the process's own after its libraries were imported and their kernels warmed
(the "loaded process"). That delta is compared with the plan's per-device peak for the same
flags (device cpu). Cases: LoRA/full, batch 1/4, gradient checkpointing on/off, and 2-process
DeepSpeed ZeRO-2. The first case, the tiny preset at 32 px (almost no data), shows the CPU
runtime's own lasting allocations that the plan adds as a constant (each family's cpu_runtime_bytes).

Before them: the devlike preset's phases (phase_rows: encode, load and train, each planned vs
measured, and the run's peak against the sum of the phases), and the memory rungs' cost in s/step
against the resident run (rung_rows: --blocks_to_swap 0 / 2 / 4 on the small preset; ZeRO-3 CPU
offload against ZeRO-3 resident, the small preset's full fine-tune).
"""

from __future__ import annotations

import json
import os
import shutil

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
    from fluxkit.training.train_args import parse

    args = parse(flags, lora=mode == "lora")
    plan = plan_memory(args, processes, 2 if processes > 1 else 0, "cpu")
    return max(p.bytes for p in plan.phases if p.name.startswith("train"))


def measure(ctx, name: str, script: str, flags: list[str], processes: int) -> int:
    """Highest measured delta over the ranks (bytes)."""
    return max(r["loop_peak_bytes"] - r["baseline_bytes"] for r in probe(ctx, name, script, flags, processes))


def probe(ctx, name: str, script: str, flags: list[str], processes: int, config: str | None = None) -> list[dict]:
    """Run the trainer under bench.memprobe (launched with the accelerate config file `config` if
    given): each rank's record."""
    out_prefix = ctx.path("memory", name.replace(" ", "_"))
    os.makedirs(os.path.dirname(out_prefix), exist_ok=True)
    cmd = harness.launch_prefix(processes, deepspeed=processes > 1, config=config) + [
        "-m", "bench.memprobe", out_prefix, script, *flags]
    env = {**harness.threads_env(processes), **PROBE_ENV}
    harness.run_command(cmd, ctx.path("logs", f"memory-{name.replace(' ', '_')}.log"), env=env, timeout=ctx.args.timeout)
    records = []
    for rank in range(processes):
        with open(f"{out_prefix}.rank{rank}.json") as f:
            records.append(json.load(f))
    return records


def phase_rows(ctx) -> tuple[list, list]:
    """The devlike preset (FLUX.1-dev's proportions, stored in bf16 like its files), LoRA from a cold
    cache: each phase's measured peak (RssAnon + RssFile: weights read in their stored dtype stay
    memory-mapped) beside the plan's, and the run's peak beside the sum of the phases."""
    from fluxkit.plan import plan_memory
    from fluxkit.tiny.build import build_datasets, build_pipeline
    from fluxkit.training.train_args import parse

    model, data = ctx.path("devlike_bf16"), ctx.path("devlike_data")
    if not os.path.isdir(model):
        build_pipeline(model, "devlike", seed=0, dtype="bf16")
    if not os.path.isdir(data):
        build_datasets(data, seed=0, resolution=256)
    flags = trainer_flags(model, os.path.join(data, "instance"), ctx.path("memory", "devlike-out"), "lora", 256, 1, False)
    flags += ["--max_train_steps", "1", "--latent_cache_dir", ctx.path("memory", "devlike-cache")]
    shutil.rmtree(ctx.path("memory", "devlike-cache"), ignore_errors=True)  # a cold cache: the encoders load
    ctx.log("memory: devlike phases")
    (r,) = probe(ctx, "devlike phases", SCRIPTS["lora"], flags, 1)
    base, peaks = r["baseline_resident_bytes"], r["phase_peak_bytes"]
    plan = plan_memory(parse(flags, lora=True), 1, 0, "cpu")
    planned = {"encode": plan.phase("encode").bytes, "load": plan.phase("load").bytes,
               "train": max(p.bytes for p in plan.phases if p.name.startswith("train"))}
    rows = []
    for phase, plan_bytes in planned.items():
        measured = peaks[phase + "+file"] - base
        error = plan_bytes / measured - 1
        judged = phase != "load"  # mapped weights fault in when first used: at the first step, not at load
        rows.append({"case": f"devlike LoRA phase: {phase}", "params": {"preset": "devlike", "mode": "lora", "px": 256,
                                                                         "batch": 1, "ckpt": "off", "processes": 1},
                     "metrics": {"planned MiB": plan_bytes / 2**20, "measured MiB": measured / 2**20, "plan error %": 100 * error,
                                 "within 15%": ("yes" if abs(error) <= TOLERANCE else "NO") if judged else "n/a (lazy mapping)"}})
    run_peak = (r["run_peak_resident_bytes"] - base) / 2**20
    note = (f"devlike: run peak {run_peak:.0f} MiB; encode {rows[0]['metrics']['measured MiB']:.0f} + train "
            f"{rows[2]['metrics']['measured MiB']:.0f} MiB would be {rows[0]['metrics']['measured MiB'] + rows[2]['metrics']['measured MiB']:.0f}"
            " if the encoders and the transformer shared the device")
    return rows, [note]


def _step_seconds(out: str) -> tuple[list, dict | None]:
    """(the run's train_log.jsonl lines, s/step after 2 warm-up steps)."""
    with open(os.path.join(out, "train_log.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    return log, harness.summarize(r["sec"] for r in log[2:])


def zero3_offload_rows(ctx) -> tuple[list, list]:
    """ZeRO-3 CPU offload (pretrain_bf16_zero3_offload_accelerate_config.yaml: parameters and optimizer
    states in host memory, the step as torch's fused AdamW on the host) against ZeRO-3 resident: the
    small preset's full fine-tune, 1 process, 5 steps. On a CPU the host is the device, so this is
    DeepSpeed's offload bookkeeping (copies between host tensors), not a transfer over a bus."""
    small = ctx.small_assets()
    rows, times = [], {}
    for name, config in (("resident", "pretrain_bf16_zero3_accelerate_config.yaml"),
                         ("CPU offload", "pretrain_bf16_zero3_offload_accelerate_config.yaml")):
        case = f"full ZeRO-3 {name}"
        out = ctx.path("memory", case.replace(" ", "_") + "-out")
        flags = trainer_flags(small["model_path"], small["instance_dir"], out, "full", 256, 1, False) + ["--max_train_steps", "5"]
        ctx.log(f"memory: {case}")
        (r,) = probe(ctx, case, SCRIPTS["full"], flags, 1, config=os.path.join(harness.ROOT, config))
        _, times[name] = _step_seconds(out)
        rows.append({"case": case, "params": {"preset": "small", "mode": "full", "px": 256, "batch": 1, "ckpt": "off",
                                              "processes": 1},
                     "metrics": {"s/step": times[name], "measured MiB": (r["loop_peak_bytes"] - r["baseline_bytes"]) / 2**20}})
    return rows, [{"name": "ZeRO-3 CPU offload / resident", "metric": "s/step", **harness.compare(times["resident"],
                                                                                                  times["CPU offload"])}]


def rung_rows(ctx) -> tuple[list, list]:
    """s/step of each memory rung against the resident run: the small preset's LoRA with gradient
    checkpointing, 0 / 2 / 4 of its 6 blocks swapped (on a CPU the host is the device: this is the
    hooks' cost, not a transfer's); ZeRO-3 CPU offload against ZeRO-3 resident (zero3_offload_rows)."""
    small = ctx.small_assets()
    rows, times = [], {}
    for swap in (0, 2, 4):
        name = f"LoRA ckpt blocks_to_swap {swap}"
        out = ctx.path("memory", name.replace(" ", "_") + "-out")
        flags = trainer_flags(small["model_path"], small["instance_dir"], out, "lora", 256, 1, True) + [
            "--blocks_to_swap", str(swap), "--max_train_steps", "5"]
        ctx.log(f"memory: {name}")
        probe(ctx, name, SCRIPTS["lora"], flags, 1)
        log, times[swap] = _step_seconds(out)
        rows.append({"case": name, "params": {"preset": "small", "mode": "lora", "px": 256, "batch": 1, "ckpt": "on",
                                              "processes": 1},
                     "metrics": {"s/step": times[swap], "blocks resident": max(r.get("resident_blocks", 6) for r in log)}})
    comparisons = [{"name": f"blocks_to_swap {n} / resident", "metric": "s/step", **harness.compare(times[0], times[n])}
                   for n in (2, 4)]
    more, compared = zero3_offload_rows(ctx)
    return rows + more, comparisons + compared


def run(ctx) -> dict:
    from fluxkit.tiny.build import build_datasets, build_pipeline

    small = ctx.small_assets()
    tiny_model, tiny_data = ctx.path("tiny_flux"), ctx.path("tiny_data")
    if not os.path.isdir(tiny_model):
        build_pipeline(tiny_model, "tiny", seed=0)
    if not os.path.isdir(tiny_data):
        build_datasets(tiny_data, seed=0, resolution=32)
    rows, failures, notes, comparisons = [], [], [], []
    for extra in (phase_rows, rung_rows):
        try:
            more = extra(ctx)
        except (harness.CommandFailed, OSError, ValueError, KeyError) as err:
            failures.append(f"{extra.__name__}: {err}")
            continue
        rows += more[0]
        (notes if extra is phase_rows else comparisons).extend(more[1])
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
    notes += [f"{STEPS} optimizer steps, bf16 mixed precision, CPU; measured = peak resident anonymous memory from "
             "accelerator.prepare() to the last step minus the loaded, warmed process's (bench/memprobe.py); "
             "2-process rows: the larger rank",
             "planned = fluxkit.plan.plan_memory(trainer flags, processes, ZeRO stage, 'cpu').peak_bytes"]
    return harness.suite_result(rows, comparisons, notes, failures)
