#!/usr/bin/env python
"""Run fluxkit's benchmark suites; print a markdown table last; write the full result as JSON.

    python -m bench                      # every suite (gpu skips itself without an accelerator)
    python -m bench flops train-lora     # some suites
    python bench/run.py infer --infer_repeats 5

Timings exclude warm-up and report the median with the spread (max - min) over repeats: the
measured optimizer steps of a training case, the runs of an inference case. A comparison
whose [min, max] ranges overlap is reported as noise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` and `fluxkit` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fluxkit.shared.host_runtime import apply_defaults  # noqa: E402

apply_defaults()  # before torch loads: suites that time steps in this process (step-levers) get the runs' wait policy
from bench import harness  # noqa: E402
from bench.suites import DEFAULT_SUITES, SUITES  # noqa: E402
from fluxkit.shared.environment import pipeline_folder_problem  # noqa: E402
from fluxkit.shared.errors import UserError, cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="*", metavar="SUITE", help=f"suites to run: {', '.join(SUITES)} (default: all)")
    p.add_argument("--train_repeats", type=int, default=1,
                   help="trainer runs per case (default 1: s/step, images/s and MFU spread over the measured steps "
                        "of all runs; the other metrics over runs)")
    p.add_argument("--train_steps", type=int, default=6,
                   help="optimizer steps per training run; the trainers leave the first --warmup_steps out (default 6)")
    p.add_argument("--infer_repeats", type=int, default=2, help="inference runs per case; medians and spreads over these (default 2)")
    p.add_argument("--warmup_steps", type=int, default=2, help="training steps excluded from throughput (default 2)")
    p.add_argument("--infer_images", type=int, default=4, help="images per inference run, split over the processes (default 4)")
    p.add_argument("--infer_steps", type=int, default=8, help="denoising steps per image (default 8)")
    p.add_argument("--infer_resolutions", type=int, nargs="+", default=[256, 512], help="inference image sizes (default 256 512)")
    p.add_argument("--families", nargs="+", default=["flux1"], metavar="FAMILY",
                   help="train suites: FLUX families to run: flux1, kontext, flux2-klein (default flux1); the others run "
                        "1 process and 2-process ZeRO-2 with the cache beside FLUX.1 at the same settings (all of "
                        "FLUX.1's cases only when flux1 is named; see bench/suites/train.py)")
    p.add_argument("--model_path", default=None, help="a `small` preset pipeline to reuse (default: build one in --work_dir)")
    p.add_argument("--peak_tflops", type=float, action="append", default=None,
                   help="flops suite: device bf16 peak(s) in TFLOP/s for the images/s table (repeatable; default 989)")
    p.add_argument("--gpu_preset", default="dev", help="gpu suite: architecture (dev = FLUX.1-dev; tiny/small to try it on CPU)")
    p.add_argument("--gpu_compile", choices=("on", "off"), default="on", help="gpu suite: also time torch.compile inference")
    p.add_argument("--startup_repeats", type=int, default=3,
                   help="startup and vs-upstream suites: alternating runs per case (default 3)")
    p.add_argument("--speed_steps", type=int, default=100, help="vs-upstream suite: optimizer steps per run (default 100)")
    p.add_argument("--lever_rounds", type=int, default=8, help="step-levers suite: alternating measured rounds (default 8)")
    p.add_argument("--lever_compile", action="store_true",
                   help="step-levers suite: also torch.compile the transformer (minutes of compiling on a small CPU)")
    p.add_argument("--vs_upstream_flags", default="",
                   help="vs-upstream suite: more flags for both scripts, one string (e.g. '--allow_tf32')")
    p.add_argument("--upstream_dir", default=os.environ.get("FLUXKIT_UPSTREAM_EXAMPLES"),
                   help="startup and vs-upstream suites: a folder with diffusers' examples/dreambooth scripts, run beside ours "
                        "(default: $FLUXKIT_UPSTREAM_EXAMPLES; none: upstream is skipped)")
    p.add_argument("--device", default="auto", choices=("auto", "npu", "cuda", "cpu"), help="device for every suite (default auto)")
    p.add_argument("--results_dir", default=os.path.join(harness.ROOT, "bench", "results"), help="where the JSON goes")
    p.add_argument("--work_dir", default=None, help="scratch folder for models and run outputs (default: a temp folder, removed)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before one trainer/inference run is killed (default 900)")
    args = p.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        raise UserError(f"unknown suite {unknown[0]!r}; choose from {', '.join(SUITES)}")
    for flag in ("train_repeats", "infer_repeats", "train_steps", "infer_images", "infer_steps", "startup_repeats", "speed_steps", "lever_rounds"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    from bench.suites.train import FAMILIES

    other = [f for f in args.families if f not in FAMILIES]
    if other:
        raise UserError(f"--families {other[0]!r} is not one of {', '.join(FAMILIES)}")
    if args.train_steps <= args.warmup_steps:
        raise UserError(f"--train_steps {args.train_steps} leaves no measured step after --warmup_steps {args.warmup_steps}; raise it")
    problem = args.model_path and pipeline_folder_problem(args.model_path)
    if problem:
        raise UserError(f"--model_path {args.model_path!r} {problem}; "
                        "build one with `python make_tiny_flux.py --preset small --output_dir DIR`")
    args.suites = args.suites or list(DEFAULT_SUITES)
    return args


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def run_suite(name: str, ctx) -> dict:
    start, load_before = time.perf_counter(), _load()
    try:
        suite = SUITES[name](ctx)
    except harness.CommandFailed as err:
        suite = {"status": "failed", "reason": str(err)}
    except Exception as err:  # one broken suite must not lose the others' numbers
        traceback.print_exc()
        suite = {"status": "failed", "reason": f"{type(err).__name__}: {err}"}
    suite["seconds"] = time.perf_counter() - start
    # other work on the host skews timings: keep the evidence with the numbers
    suite["load_average"] = [load_before, _load()]
    return suite


@cli
def main(argv=None):
    from fluxkit.shared.device import detect

    args = parse_args(argv)
    info = detect(args.device)
    argv = sys.argv[1:] if argv is None else list(argv)
    result = harness.new_result(argv, {k: v for k, v in vars(args).items()}, info)
    own_work_dir = args.work_dir is None
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="fluxkit-bench-")
    os.makedirs(work_dir, exist_ok=True)
    ctx = harness.Context(args, info, work_dir)
    try:
        for name in args.suites:
            ctx.log(f"suite {name}")
            result["suites"][name] = run_suite(name, ctx)
            ctx.log(f"suite {name}: {result['suites'][name]['status']} in {result['suites'][name]['seconds']:.0f}s")
    finally:
        failed = any(s["status"] == "failed" for s in result["suites"].values())
        if own_work_dir and not failed:
            shutil.rmtree(work_dir, ignore_errors=True)
        elif own_work_dir:
            ctx.log(f"kept {work_dir} for the failed runs' logs")
    path = harness.write_result(result, args.results_dir)
    print(harness.results_markdown(result))
    shown = os.path.relpath(path)
    print(f"\nfull results: {path if shown.startswith('..') else shown}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
