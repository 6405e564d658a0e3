"""data: the streaming data path and the persistent latent/text cache, on the `small` preset.

- peak RSS of a 2-step LoRA run at 512x512 with 16 vs 256 images (streaming: host memory must
  not grow with the dataset; the target is under 100 MB apart);
- time to the first training step with a cold cache (every image and caption encoded) and a warm
  one (the same data and model again: nothing encoded, no text encoder loaded);
- images/s with aspect-ratio buckets vs square crops on mixed-shape images (both warm);
- on the `devlike` preset (FLUX.1-dev's proportions: T5 40% of the transformer), the memory of the
  same run with a warm cache (the text encoders never load, the VAE encoder is dropped) and in
  today's upstream design (--no_cache: every encoder resident for the whole run).

Each case is one trainer subprocess; peak RSS is the largest resident set of the trainer or any of
its DataLoader workers (host memory on every device); setup time is the summary's e2e - train seconds.
The devlike pair runs under bench.memprobe instead: the peak resident anonymous memory of the whole
run, and the highest during training (prepare() to the last step) above the loaded, warmed process.
"""

from __future__ import annotations

import os
import sys

from .. import harness
from .train import read_summary

RESOLUTION = 512
SCRIPT = "train_flux_dreambooth_lora.py"
PROMPT = "a photo of sks dog"
# Runs the trainer as a child and prints the largest resident set of it and its descendants (the
# DataLoader workers included): host memory on any device, where the summary reports device memory.
PEAK_RSS = ("import resource, subprocess, sys; rc = subprocess.call([sys.executable] + sys.argv[1:]); "
            "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(rc)")
MIXED_IMAGES = 16
MIXED_SIZES = [(768, 512), (512, 768), (512, 512), (1024, 384), (384, 1024), (640, 512), (512, 640), (896, 448)]


def _images(folder: str, count: int, sizes) -> str:
    """count smooth random JPEGs (cheap to store, real to decode) in folder, built once."""
    if os.path.isdir(folder) and len(os.listdir(folder)) >= count:
        return folder
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        small = rng.integers(0, 256, size=(h // 32, w // 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(os.path.join(folder, f"img{i:04d}.jpg"), quality=90)
        with open(os.path.join(folder, f"img{i:04d}.txt"), "w", encoding="utf-8") as f:
            f.write(f"{PROMPT}, picture {i % 7}")
    return folder


def _flags(ctx, name: str, model: str, images: str, cache_dir: str, steps: int, extra=(), resolution=RESOLUTION) -> list:
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", images, "--instance_prompt", PROMPT,
            "--resolution", str(resolution), "--train_batch_size", "1", "--max_train_steps", str(steps),
            "--throughput_warmup_steps", str(min(ctx.args.warmup_steps, steps - 1)), "--lr_warmup_steps", "0",
            "--checkpointing_steps", str(10**9), "--mixed_precision", "bf16", "--seed", "0", "--report_to", "none",
            "--output_dir", ctx.path(name), "--latent_cache_dir", cache_dir, "--device", ctx.args.device, *extra]


def _run(ctx, name: str, model: str, images: str, cache_dir: str, steps: int, extra=()) -> dict:
    stdout = harness.run_command([sys.executable, "-c", PEAK_RSS, SCRIPT, *_flags(ctx, name, model, images, cache_dir, steps, extra)],
                                 ctx.path("logs", name + ".log"), env=harness.threads_env(1), timeout=ctx.args.timeout)
    summary = read_summary(stdout, ctx.path(name))
    rss = [line for line in stdout.splitlines() if line.startswith("peak_rss_kb ")]
    summary["peak_rss_gb"] = int(rss[-1].split()[1]) / 2**20 if rss else None
    return summary


DEVLIKE_RESOLUTION, DEVLIKE_T5_TOKENS = 256, 77  # the full fine-tune's T5 length: seconds per step on a CPU


def _probed(ctx, name: str, model: str, images: str, cache_dir: str, extra=()) -> dict:
    """A 2-step devlike LoRA run under bench.memprobe: its summary plus the probe's peaks."""
    import json

    from .memory import PROBE_ENV

    flags = _flags(ctx, name, model, images, cache_dir, 2, ("--max_sequence_length", str(DEVLIKE_T5_TOKENS), *extra),
                   resolution=DEVLIKE_RESOLUTION)
    prefix = ctx.path("logs", name + "-probe")
    stdout = harness.run_command([sys.executable, "-m", "bench.memprobe", prefix, SCRIPT, *flags], ctx.path("logs", name + ".log"),
                                 env={**harness.threads_env(1), **PROBE_ENV}, timeout=ctx.args.timeout)
    summary = read_summary(stdout, ctx.path(name))
    with open(prefix + ".rank0.json") as f:
        probe = json.load(f)
    summary["peak_rss_gb"] = probe["run_peak_bytes"] / 2**30
    summary["loop_gb"] = (probe["loop_peak_bytes"] - probe["baseline_bytes"]) / 2**30
    return summary


def _devlike_model(ctx) -> str:
    from fluxkit.tiny.build import build_pipeline

    model = ctx.path("devlike_flux")
    if not os.path.isdir(model):
        ctx.log("building the devlike random FLUX pipeline (FLUX.1-dev's proportions)")
        build_pipeline(model, "devlike", seed=0)
    return model


def run(ctx) -> dict:
    if not os.path.isfile(os.path.join(harness.ROOT, SCRIPT)):
        return {"status": "skipped", "reason": f"{SCRIPT} is not in this checkout"}
    model = ctx.small_assets()["model_path"]
    rows, failures, found = [], [], {}

    def case(label, params, fn):
        try:
            s = fn()
        except harness.CommandFailed as err:
            failures.append(f"{label}: {err}")
            return None
        found[label] = s
        rows.append({"case": label, "params": params, "metrics": {
            "peak RSS GB": harness.summarize([s["peak_rss_gb"]]),
            "setup s (to first step)": harness.summarize([s["e2e_seconds"] - s["train_seconds"]]),
            "images/s": harness.summarize(s.get("step_seconds") and [1 / t for t in s["step_seconds"]] or [s["images_per_sec"]]),
        }})
        return s

    for n in (16, 256):  # streaming: --no_cache, so the run decodes only what its 2 steps train
        folder = _images(ctx.path(f"data-{n}"), n, [(RESOLUTION, RESOLUTION)])
        case(f"{n} images, 2 steps", {"images": n, "cache": "off"},
             lambda: _run(ctx, f"data-rss-{n}", model, folder, ctx.path(f"cache-rss-{n}"), 2, ("--no_cache",)))
    # sized for a few minutes on a 2-core host: every image of a cold run is encoded at 512x512
    folder = _images(ctx.path("data-16"), 16, [(RESOLUTION, RESOLUTION)])
    for warmth in ("cold", "warm"):
        case(f"16 images, cache {warmth}", {"images": 16, "cache": warmth},
             lambda: _run(ctx, f"data-cache-{warmth}", model, folder, ctx.path("cache-16"), 2))
    mixed = _images(ctx.path("data-mixed"), MIXED_IMAGES, MIXED_SIZES)
    steps = ctx.args.train_steps
    _run_safely = lambda name, extra: _run(ctx, name, model, mixed, ctx.path("cache-mixed"), steps, extra)  # noqa: E731
    try:
        _run_safely("data-mixed-fill", ())  # fills the cache for the square case; buckets fill their own below
        _run_safely("data-mixed-fill-b", ("--aspect_ratio_buckets",))
    except harness.CommandFailed as err:
        failures.append(f"mixed-shape cache fill: {err}")
    case("mixed shapes, square crops", {"images": MIXED_IMAGES, "cache": "warm", "buckets": "off"},
         lambda: _run_safely("data-square", ()))
    case("mixed shapes, aspect-ratio buckets", {"images": MIXED_IMAGES, "cache": "warm", "buckets": "on"},
         lambda: _run_safely("data-buckets", ("--aspect_ratio_buckets",)))

    devlike = _devlike_model(ctx)
    few = _images(ctx.path("data-4"), 4, [(RESOLUTION, RESOLUTION)])
    try:  # fill the devlike cache first (not measured): the warm case then never loads a text encoder
        _probed(ctx, "devlike-fill", devlike, few, ctx.path("cache-devlike"))
    except harness.CommandFailed as err:
        failures.append(f"devlike cache fill: {err}")
    for label, extra in (("devlike, today's design (--no_cache: encoders resident)", ("--no_cache",)),
                         ("devlike, warm cache (encoders not loaded)", ())):
        s = None
        try:
            s = _probed(ctx, "devlike-" + ("uncached" if extra else "warm"), devlike, few, ctx.path("cache-devlike"), extra)
        except harness.CommandFailed as err:
            failures.append(f"{label}: {err}")
        if s:
            rows.append({"case": label, "params": {"images": 4, "preset": "devlike", "cache": "off" if extra else "warm"},
                         "metrics": {"peak RSS GB": harness.summarize([s["peak_rss_gb"]]),
                                     "training-loop GB above the loaded process": harness.summarize([s["loop_gb"]]),
                                     "setup s (to first step)": harness.summarize([s["e2e_seconds"] - s["train_seconds"]])}})

    comparisons = []
    pairs = [("16 images, 2 steps", "256 images, 2 steps", "peak RSS GB"),
             ("16 images, cache cold", "16 images, cache warm", "setup s (to first step)"),
             ("mixed shapes, square crops", "mixed shapes, aspect-ratio buckets", "images/s"),
             ("devlike, today's design (--no_cache: encoders resident)", "devlike, warm cache (encoders not loaded)", "peak RSS GB"),
             ("devlike, today's design (--no_cache: encoders resident)", "devlike, warm cache (encoders not loaded)",
              "training-loop GB above the loaded process")]
    by_label = {r["case"]: r["metrics"] for r in rows}
    for base, other, metric in pairs:
        if base in by_label and other in by_label:
            comparisons.append({"name": f"{other} vs {base}", "metric": metric,
                                **harness.compare(by_label[base][metric], by_label[other][metric])})
    notes = [f"small preset, {RESOLUTION}x{RESOLUTION}, micro batch 1, bf16, one process, LoRA; captions from .txt files",
             "peak RSS: the largest resident set of the trainer or one of its workers; setup: e2e - train seconds",
             f"devlike: FLUX.1-dev's proportions (84M transformer, 34M T5), {DEVLIKE_RESOLUTION}x{DEVLIKE_RESOLUTION}, "
             f"T5 {DEVLIKE_T5_TOKENS} tokens, 4 images, 2 steps, under bench.memprobe (peak resident anonymous memory)",
             f"mixed shapes: {', '.join(f'{w}x{h}' for w, h in MIXED_SIZES)}; images/s over the measured steps"]
    return harness.suite_result(rows, comparisons, notes, failures)
