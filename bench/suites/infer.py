"""infer: the `small` preset at 256x256 and 512x512, 8 denoising steps: one process, two processes
data-parallel (each renders half the images), two processes Ulysses (each image split over both).

Runs infer_flux_text2img_distrib.py (every prompt x seed pair once, split over the processes)
as a subprocess --infer_repeats times per case and reads OUTPUT_DIR/infer_summary.json. The
first image of each data-parallel group (warm-up: lazy init, allocator) is left out: its time is
the summary's first_batch_seconds, and the groups warm up side by side.
"""

from __future__ import annotations

import json
import os

from .. import harness

SCRIPT = "infer_flux_text2img_distrib.py"
PROMPT = "a photo of sks dog"


# (case label, processes, --ulysses_degree)
MODES = (("1p", 1, 1), ("2p data-parallel", 2, 1), ("2p ulysses 2", 2, 2))


def measured(summary: dict) -> dict | None:
    """s/image and denoising steps/s over the images after each data-parallel group's first batch."""
    groups = (summary.get("grid") or {}).get("data_parallel", summary["num_processes"])
    warm = groups * summary["batch_size"]
    images = summary["images_written"] - warm
    seconds = summary["seconds"] - (summary.get("first_batch_seconds") or 0.0)
    if images <= 0 or seconds <= 0:
        return None
    return {"s/image": seconds / images, "it/s": images * summary["num_inference_steps"] / seconds}


def run(ctx) -> dict:
    if not os.path.isfile(os.path.join(harness.ROOT, SCRIPT)):
        return {"status": "skipped", "reason": f"{SCRIPT} is not in this checkout"}
    if ctx.args.infer_images < 2 * 2:
        return {"status": "skipped", "reason": f"--infer_images {ctx.args.infer_images} leaves no image after warm-up "
                                               "with 2 processes; use 4 or more"}
    assets = ctx.small_assets()
    cases = [(res, mode) for res in ctx.args.infer_resolutions for mode in MODES]
    from tqdm.auto import tqdm

    rows, failures = [], []
    bar = tqdm(total=len(cases) * ctx.args.infer_repeats, desc="infer", unit="run")
    for res, (label, procs, ulysses) in cases:
        runs = []
        for repeat in range(ctx.args.infer_repeats):
            name = f"infer-{res}-{procs}p-u{ulysses}-{repeat}"
            out = ctx.path(name)
            cmd = harness.launch_prefix(procs) + [
                SCRIPT, "--model_path", assets["model_path"], "--prompt", PROMPT,
                "--seeds", *map(str, range(ctx.args.infer_images)), "--num_inference_steps", str(ctx.args.infer_steps),
                "--height", str(res), "--width", str(res), "--batch_size", "1", "--dtype", "bf16",
                "--device", ctx.args.device, "--output_dir", out, "--overwrite", "--ulysses_degree", str(ulysses)]
            try:
                harness.run_command(cmd, ctx.path("logs", name + ".log"), env=harness.threads_env(procs), timeout=ctx.args.timeout)
                with open(os.path.join(out, "infer_summary.json")) as f:
                    runs.append(json.load(f))
            except (harness.CommandFailed, OSError, ValueError) as err:
                failures.append(f"{name}: {err}")
            bar.update(1)
        timed = [m for m in map(measured, runs) if m]
        if not timed:
            continue
        rows.append({"case": f"{res}x{res}, {label}", "params": {"resolution": res, "processes": procs, "ulysses_degree": ulysses,
                                                                 "steps": ctx.args.infer_steps},
                     "metrics": {"s/image": harness.summarize(m["s/image"] for m in timed),
                                 "it/s (all processes)": harness.summarize(m["it/s"] for m in timed),
                                 "first image s": harness.summarize(r.get("first_batch_seconds") for r in runs),
                                 "load s": harness.summarize(r.get("load_seconds") for r in runs)}})
    bar.close()

    by_case = {(r["params"]["resolution"], r["params"]["processes"], r["params"]["ulysses_degree"]): r["metrics"] for r in rows}
    comparisons = []
    for res in ctx.args.infer_resolutions:
        for (_, procs, ulysses) in MODES[1:]:
            if (res, 1, 1) in by_case and (res, procs, ulysses) in by_case:
                comparisons.append({"name": f"{res}x{res}: {procs}p ulysses {ulysses} / 1p" if ulysses > 1 else f"{res}x{res}: {procs}p / 1p",
                                    "metric": "s/image", **harness.compare(by_case[(res, 1, 1)]["s/image"],
                                                                           by_case[(res, procs, ulysses)]["s/image"])})
    notes = [f"small preset, bf16, {ctx.args.infer_images} images per run ({PROMPT!r} x seeds), batch 1; "
             "2 processes via accelerate launch, each with half the cores",
             "s/image and it/s cover the whole pipeline call (text encoders, denoising steps, VAE decode, PNG write), "
             "after each group's first image; it/s = images x steps / seconds over all processes",
             "ulysses 2: both processes render every image together (all-to-all around each attention over gloo); "
             "on a CPU host it shows the communication overhead, not a speed-up: the cores are the same ones"]
    return harness.suite_result(rows, comparisons, notes, failures)
