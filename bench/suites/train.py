"""train-full / train-lora: the toolkit's trainers on the `small` preset, 256x256, batch 2, one
fixed instance prompt; one process and 2-process DeepSpeed ZeRO-2; caching on and off; for LoRA
also int8 and NF4 quantized bases (--base_quantization) beside the unquantized one.

--families adds the other FLUX families at the same settings (one process and 2-process ZeRO-2,
cache on) beside FLUX.1's rows (without flux1 in the list, FLUX.1 runs just those two cases, as
their baseline): Kontext editing pairs (the small FLUX.1 folder trained as
--model_family kontext on the sample editing pairs; LoRA only), FLUX.2 [klein] text-to-image and
editing (its own small preset; LoRA and full). An editing pair's reference image adds as many
tokens as its target, and its FLOPs are counted (fluxkit.shared.flops with the family's FLOP count).

Each case runs the trainer --train_repeats times as a subprocess and reads its JSON summary;
its measured step times (after the trainer's warm-up steps) are the repeats of s/step,
images/s and MFU; the other metrics are per run. MFU is recomputed here from the
summary's s/step with fluxkit.shared.flops, so full and LoRA runs are counted the same way whatever
the trainer reports (its own figure is kept as `trainer mfu`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from fluxkit.shared import flops

from .. import harness

SCRIPTS = {"full": "train_flux_dreambooth.py", "lora": "train_flux_dreambooth_lora.py"}
RESOLUTION = 256
BATCH = 2
INSTANCE_PROMPT = "a photo of sks dog"
T5_TOKENS = 77  # --max_sequence_length of every case (the text tokens the FLOP count uses)
SUMMARY_PREFIX = '{"images_per_sec": '
CASES = [(1, True), (1, False), (2, True), (2, False)]  # (processes, caching)
# LoRA over a quantized frozen base (processes, quantization), cache on; int8 is refused under DeepSpeed
QUANTIZED_CASES = [(1, "int8"), (1, "nf4"), (2, "nf4")]
FAMILY_CASES = [(1, True), (2, True)]  # (processes, caching) of each other family's tasks
FAMILIES = ("flux1", "kontext", "flux2-klein")
# (family, task) rows --families adds, per trainer: Kontext trains editing pairs (text-to-image is FLUX.1's run)
FAMILY_TASKS = {"lora": [("kontext", "edit"), ("flux2-klein", "t2i"), ("flux2-klein", "edit")],
                "full": [("flux2-klein", "t2i"), ("flux2-klein", "edit")]}


@dataclass
class Case:
    family: str
    task: str                      # t2i or edit
    processes: int
    cache: bool
    quantization: str = "none"
    flags: list = field(default_factory=list)  # the family's data and model flags

    @property
    def label(self) -> str:
        family = "" if self.family == "flux1" else f"{self.family} {self.task}, "
        base = "" if self.quantization == "none" else f", {self.quantization} base"
        kind = "DeepSpeed ZeRO-2" if self.processes > 1 else "single"
        return f"{family}{self.processes}p {kind}, cache {'on' if self.cache else 'off'}{base}"


def _cases(mode: str, families=("flux1",)) -> list[Case]:
    """Every case this suite runs for `mode`: FLUX.1's, then the other families' asked for. Without
    flux1 among `families`, FLUX.1 runs only the cases the families run (their baseline)."""
    if "flux1" not in families:
        return [Case("flux1", "t2i", processes, cache) for processes, cache in FAMILY_CASES] + \
            [Case(family, task, processes, cache) for family, task in FAMILY_TASKS[mode] if family in families
             for processes, cache in FAMILY_CASES]
    cases = [Case("flux1", "t2i", processes, cache) for processes, cache in CASES]
    if mode == "lora":
        cases += [Case("flux1", "t2i", processes, True, q) for processes, q in QUANTIZED_CASES]
    for family, task in FAMILY_TASKS[mode]:
        if family in families:
            cases += [Case(family, task, processes, cache) for processes, cache in FAMILY_CASES]
    return cases


def _family_flags(ctx, case: Case) -> tuple[dict, list[str]]:
    """(assets: model_path, instance_dir; extra trainer flags) of a case's family and task."""
    assets = dict(ctx.small_assets())
    extra = []
    if case.family == "flux2-klein":
        assets["model_path"] = ctx.small_model("flux2-klein")
    if case.family == "kontext":
        extra += ["--model_family", "kontext"]
    if case.task == "edit":
        assets["instance_dir"] = assets["edit_targets"]
        extra += ["--cond_image_dir", assets["edit_references"]]
    return assets, extra


def _flags(ctx, mode: str, assets: dict, output_dir: str, cache: bool, quantization: str = "none") -> list[str]:
    flags = ["--pretrained_model_name_or_path", assets["model_path"], "--instance_data_dir", assets["instance_dir"],
             "--instance_prompt", INSTANCE_PROMPT, "--resolution", str(RESOLUTION), "--train_batch_size", str(BATCH),
             "--max_sequence_length", str(T5_TOKENS),
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


def _measure(ctx, mode: str, case: Case, failures: list, bar) -> dict | None:
    """One case's row: its runs' summaries as repeat summaries (None when every run failed)."""
    from fluxkit import families

    script = SCRIPTS[mode]
    assets, extra = _family_flags(ctx, case)
    geometry = harness.model_geometry(assets["model_path"])
    tokens = flops.image_tokens(RESOLUTION, RESOLUTION, geometry["vae_scale_factor"]) * (2 if case.task == "edit" else 1)
    peak = harness.process_peak_flops(ctx.device, torch.bfloat16, case.processes)
    summaries = []
    for repeat in range(ctx.args.train_repeats):
        family = "" if case.family == "flux1" else f"-{case.family}-{case.task}"
        base = "" if case.quantization == "none" else f"-{case.quantization}"
        name = f"train-{mode}{family}-{case.processes}p-{'cache' if case.cache else 'nocache'}{base}-{repeat}"
        out = ctx.path(name)
        cmd = harness.launch_prefix(case.processes, deepspeed=case.processes > 1) + [
            script, *_flags(ctx, mode, assets, out, case.cache, case.quantization), *extra]
        try:
            stdout = harness.run_command(cmd, ctx.path("logs", name + ".log"), env=harness.threads_env(case.processes),
                                         timeout=ctx.args.timeout)
            summaries.append(read_summary(stdout, out))
        except harness.CommandFailed as err:
            failures.append(f"{name}: {err}")
        bar.update(1)
    if not summaries:
        return None
    # model FLOPs of one optimizer step on one process, from the summary's own batch geometry
    s0 = summaries[0]
    images_per_step = s0["micro_batch"] * s0["world_size"] * s0["grad_accum"]
    step_flops = flops.training_step_flops(geometry["transformer"], tokens, T5_TOKENS, batch=s0["micro_batch"] * s0["grad_accum"],
                                           frozen_base=mode == "lora", flop_parts=families.get(case.family).flop_parts())
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
    return {"case": case.label,
            "params": {"family": case.family, "task": case.task, "processes": case.processes, "cache": "on" if case.cache else "off",
                       "base quantization": case.quantization, "global batch": images_per_step, "runs": len(summaries),
                       "measured steps": len(steps)},
            "metrics": {k: v for k, v in metrics.items() if v is not None}}


def _comparisons(rows: list[dict]) -> list[dict]:
    """Cache on/off, 2p/1p, quantized/unquantized (FLUX.1) and each family against FLUX.1 at the same settings."""
    def key(r):
        p = r["params"]
        return p["family"], p["task"], p["processes"], p["cache"], p["base quantization"]

    by = {key(r): r["metrics"] for r in rows}
    comparisons = []

    def compare(name, metric, base, other):
        if base and other and metric in base and metric in other:
            comparisons.append({"name": name, "metric": metric, **harness.compare(base[metric], other[metric])})

    for p in (1, 2):
        for metric in ("images/s", "e2e s", "peak mem GB/process"):
            compare(f"{p}p: cache on / off", metric, by.get(("flux1", "t2i", p, "off", "none")), by.get(("flux1", "t2i", p, "on", "none")))
    compare("cache on: 2p DeepSpeed / 1p", "images/s", by.get(("flux1", "t2i", 1, "on", "none")), by.get(("flux1", "t2i", 2, "on", "none")))
    for (family, task, p, cache, q), metrics in by.items():
        plain = by.get(("flux1", "t2i", p, cache, "none"))
        if family == "flux1" and q != "none":
            for metric in ("images/s", "peak mem GB/process"):
                compare(f"{p}p cache on: {q} base / unquantized", metric, plain, metrics)
        elif family != "flux1":
            for metric in ("images/s", "peak mem GB/process"):
                compare(f"{p}p cache {cache}: {family} {task} / flux1 t2i", metric, plain, metrics)
    return comparisons


def run(ctx, mode: str) -> dict:
    script = SCRIPTS[mode]
    if not os.path.isfile(os.path.join(harness.ROOT, script)):
        return {"status": "skipped", "reason": f"{script} is not in this checkout"}
    from tqdm.auto import tqdm

    cases = _cases(mode, ctx.args.families)
    failures = []
    bar = tqdm(total=len(cases) * ctx.args.train_repeats, desc=f"train-{mode}", unit="run")
    rows = [row for row in (_measure(ctx, mode, case, failures, bar) for case in cases) if row is not None]
    bar.close()
    notes = [f"small preset, {RESOLUTION}x{RESOLUTION}, batch {BATCH} per process, {T5_TOKENS} text tokens, {ctx.args.train_steps} "
             f"steps of which {ctx.args.warmup_steps} warm-up, bf16; prompt {INSTANCE_PROMPT!r}",
             "MFU: model FLOPs of the transformer (fluxkit.shared.flops, the family's count; LoRA counts no base weight gradients; "
             "an editing pair's reference tokens count) per process / "
             f"s/step / that process's peak ({'measured all-core bf16 matmul peak / processes' if ctx.device.type == 'cpu' else 'datasheet'})",
             "peak memory: per process (resident set size on CPU, allocated device memory on accelerators)"]
    if set(ctx.args.families) - {"flux1"}:
        notes.append("families: Kontext = the small FLUX.1 folder as --model_family kontext on the sample editing pairs; "
                     "FLUX.2 [klein] = its own small preset (make_tiny_flux.py --family flux2-klein --preset small); "
                     "edit = --instance_data_dir edit/targets --cond_image_dir edit/references")
    return harness.suite_result(rows, _comparisons(rows), notes, failures)
