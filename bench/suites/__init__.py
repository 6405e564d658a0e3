"""The named suites. Each is `run(ctx) -> dict` with status ("ok", "skipped", "failed"),
reason, rows ([{case, params, metrics, table?}]), comparisons and notes; see bench.harness."""

from __future__ import annotations

import functools

from . import data, flops, gpu, infer, levers, memory, startup, train, upstream

SUITES = {
    "flops": flops.run,
    "data": data.run,
    "train-full": functools.partial(train.run, mode="full"),
    "train-lora": functools.partial(train.run, mode="lora"),
    "infer": infer.run,
    "memory": memory.run,
    "gpu": gpu.run,
    "startup": startup.run,
    "vs-upstream": upstream.run,
    "step-levers": levers.run,
}
DEFAULT_SUITES = list(SUITES)
