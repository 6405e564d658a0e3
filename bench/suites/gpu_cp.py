"""The gpu suite's context-parallel case: one image split over every process (Ulysses), timed.

    accelerate launch --multi_gpu --num_processes N bench/suites/gpu_cp.py --preset dev --resolution 1024 \\
        --steps 28 --repeats 3 --out RESULT.json

Every process builds the same random-weight model (same seed) on its own device, then the
transformer's attention is split over all N processes with fluxkit's inference path
(fluxkit.inference.parallel: the attention backend for the device, the CPU device-count patch,
diffusers' ContextParallelConfig). Rank 0 writes the timings. On a CPU host (gloo) this checks
the code path with a small preset; the numbers only mean something on accelerators.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from fluxkit.shared.device import detect, synchronize  # noqa: E402
from fluxkit.inference.parallel import (choose_attention_backend, distributed_state, enable_context_parallel,  # noqa: E402
                                    plan_grid)

T5_TOKENS = 512  # FluxPipeline's default


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dev")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from fluxkit.tiny.build import SCHEDULER_CONFIG, build_clip_tokenizer, build_models, build_t5_tokenizer, resolve_preset

    info = detect("auto")
    state = distributed_state(info.type)
    grid = plan_grid(state.num_processes, state.num_processes, 1)
    backend = choose_attention_backend("auto", info.type, True, grid)
    preset = resolve_preset(args.preset)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(state.device):
            torch.manual_seed(0)  # the same random weights on every process
            models = build_models(preset)
    finally:
        torch.set_default_dtype(previous)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
                        tokenizer=build_clip_tokenizer(preset.clip_vocab), tokenizer_2=build_t5_tokenizer(preset.t5_vocab),
                        **models)
    pipe.set_progress_bar_config(disable=True)
    enable_context_parallel(pipe.transformer, grid, backend, info.type)

    def generate(steps: int):
        return pipe(prompt="a photo of sks dog", height=args.resolution, width=args.resolution, num_inference_steps=steps,
                    guidance_scale=3.5, max_sequence_length=T5_TOKENS, generator=torch.Generator("cpu").manual_seed(0),
                    output_type="pil")

    start = time.perf_counter()
    generate(2)  # warm-up: kernels, allocator, the process groups' first collectives
    synchronize(info)
    warmup = time.perf_counter() - start
    per_image = []
    for _ in range(args.repeats):
        state.wait_for_everyone()
        start = time.perf_counter()
        generate(args.steps)
        synchronize(info)
        state.wait_for_everyone()
        per_image.append(time.perf_counter() - start)
    if state.is_main_process:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"s/image": per_image, "warm-up s": warmup, "processes": state.num_processes,
                       "ulysses_degree": grid.ulysses, "attention_backend": backend, "device": info.type}, f)
    state.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
