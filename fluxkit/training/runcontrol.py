"""Run control: how a training run stops and how fast it goes.

`StopRequest` turns SIGINT/SIGTERM into "checkpoint at the next optimizer step, then exit"
(`Interrupted`, exit status 2 with the resume command); `Throughput` measures images/s after
warm-up and model FLOPs utilisation from the FLOP count of one step (`flops_and_peak`).
"""

from __future__ import annotations

import sys

import torch

from ..shared import flops
from ..shared.device import peak_memory_bytes
from ..shared.errors import UserError


class Interrupted(UserError):
    """Training stopped on request after writing a checkpoint (exit status 2 with how to resume).
    Every process stops at the same agreed step and raises it alike: the first process says it."""

    agreed = True


class StopRequest:
    """SIGINT/SIGTERM ask for a checkpoint at the next optimizer step, then a clean exit.

    Ranks can see a signal at different steps, and saving is collective, so they agree on it
    (a max-reduce of the flag) before anyone saves. A second signal stops at once.
    """

    def __init__(self):
        import signal

        self.signal_name = None
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame):
        import signal

        if self.signal_name is not None:  # second signal: give up on the checkpoint
            self.restore()
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name} received: finishing this step and saving a checkpoint (send again to stop now)",
              file=sys.stderr, flush=True)

    def requested(self, accelerator) -> bool:
        flag = self.signal_name is not None
        if accelerator.num_processes > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
            flag = accelerator.reduce(t, reduction="sum").item() > 0
            if flag and self.signal_name is None:
                self.signal_name = "a signal on another process"
        return flag

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Throughput:
    """images/s = micro batch x processes x accumulation / optimizer-step wall time, after warm-up."""

    def __init__(self, images_per_step: int, warmup: int, flops_per_step: float | None, peak_flops: float | None, device_info):
        self.images_per_step, self.warmup = images_per_step, warmup
        self.flops_per_step, self.peak_flops, self.info = flops_per_step, peak_flops, device_info
        self.times: list[float] = []
        self.seen = 0
        self.last = None

    def record(self, seconds: float) -> None:
        self.seen += 1
        self.last = seconds
        if self.seen > self.warmup:
            self.times.append(seconds)

    def summary(self) -> dict:
        sec = sum(self.times) / len(self.times) if self.times else float("nan")
        mfu = flops.mfu(self.flops_per_step, sec, self.peak_flops) if self.flops_per_step and self.times else None
        return {"images_per_sec": self.images_per_step / sec if self.times else None,
                "sec_per_step": sec if self.times else None, "measured_steps": len(self.times),
                "step_seconds": [round(t, 6) for t in self.times],  # per-step spread for bench/
                "mfu": mfu, "peak_memory_gb": peak_memory_bytes(self.info) / 2**30}


def flops_and_peak(args, m, device_info, weight_dtype, per_process_images: int):
    """Model FLOPs of one optimizer step on one process (m: the run's Models), and that device's
    peak FLOP/s (or None)."""
    vae_scale = 2 ** (len(m.vae.config.block_out_channels) - 1)
    tokens = flops.image_tokens(args.resolution, args.resolution, vae_scale)
    from ..data.pairs import editing_requested

    if editing_requested(args):  # a reference image placed in its target's shape: as many tokens again
        tokens *= 2
    step_flops = flops.training_step_flops(m.transformer.config, tokens, args.max_sequence_length,
                                           batch=per_process_images, frozen_base=args.lora,
                                           flop_parts=m.family.flop_parts())
    return step_flops, flops.peak_flops(device_info, weight_dtype)
