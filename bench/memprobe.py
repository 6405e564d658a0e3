"""Run a trainer script in this process and record its peak resident memory (bench's memory suite).

    python -m bench.memprobe OUT_PREFIX SCRIPT [ARGS]      (also under `accelerate launch`)

Writes OUT_PREFIX.rank{RANK}.json with:
  baseline_bytes   RSS after the heavy libraries are imported, before the script runs
  loop_peak_bytes  highest RSS from the end of accelerator.prepare() to the last optimizer step
  run_peak_bytes   highest RSS over the whole script (loading and saving included)
  phase_peak_bytes highest RssAnon per phase of fluxkit.training.train: encode (the encoders load, fill the
                   cache and leave), load (the transformer arrives, up to accelerator.prepare()), train;
                   PHASE+file: the same with file-mapped pages (memory-mapped weights) added
  timeline         (seconds, anon - baseline, anon + file - its baseline, phase) every 10 ms
A thread samples RSS every millisecond (psutil); glibc is told (by the suite, through
MALLOC_MMAP_THRESHOLD_) to return freed blocks to the system, so RSS follows live memory.
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import sys
import threading
import time

from fluxkit.shared.environment import process_rank


def memory_status() -> tuple[int, int]:
    """(RssAnon, RssFile) of this process in bytes. RssAnon is the process's data, without the shared
    libraries' code pages (they fault in as kernels are first used). RssFile adds what is mapped
    from files: weights read from safetensors in their stored dtype stay memory-mapped (file-backed,
    shared between processes reading the same file), so they count there, not in RssAnon."""
    anon = file = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1]) * 1024
    except OSError:
        pass
    if anon is None:
        import psutil

        return psutil.Process().memory_info().rss, 0
    return anon, file or 0


def anonymous_rss() -> int:
    return memory_status()[0]


class Sampler(threading.Thread):
    """Samples RSS every `interval` seconds: the run's peak, the training window's peak (from
    accelerator.prepare() on), the peak of each phase label, and a timeline of (seconds, bytes, phase)."""

    def __init__(self, interval: float = 0.001):
        super().__init__(daemon=True)
        self.interval = interval
        self.run_peak = self.window_peak = 0
        self.window_open = False
        self.loop_peak = 0
        self.stopped = threading.Event()
        self.phase = "start"
        self.phase_peaks: dict[str, int] = {}
        self.timeline: list = []
        self.t0 = time.perf_counter()

    def sample(self) -> int:
        rss, file = memory_status()
        self.run_peak = max(self.run_peak, rss)
        self.run_peak_resident = max(getattr(self, "run_peak_resident", 0), rss + file)
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), rss)
        key = self.phase + "+file"
        self.phase_peaks[key] = max(self.phase_peaks.get(key, 0), rss + file)
        if self.window_open:
            self.window_peak = max(self.window_peak, rss)
        return rss

    def run(self):
        last = -1.0
        while not self.stopped.is_set():
            self.sample()
            now = time.perf_counter() - self.t0
            if now - last >= 0.01:  # the timeline keeps one point per 10 ms: (s, anon, anon + file, phase)
                anon, file = memory_status()
                self.timeline.append((round(now, 3), anon, anon + file, self.phase))
                last = now
            time.sleep(self.interval)

    def enter(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        self.sample()


def mark_phases(sampler: Sampler) -> None:
    """Label the trainer's phases (fluxkit.training.train): 'encode' until the cache is filled and the encoders
    are released (the encoders' loading included), 'load' until accelerator.prepare() returns, then
    'train'."""
    import fluxkit.training.train as train

    encode = train.encode_phase

    def encode_phase(*args, **kwargs):
        try:
            return encode(*args, **kwargs)
        finally:
            sampler.enter("load")

    train.encode_phase = encode_phase
    sampler.enter("encode")


def warm_up_kernels() -> None:
    """One training step of the tiny preset in every precision the trainers use, then drop it.

    The first forward/backward on a CPU makes lasting allocations of its own (oneDNN's JIT
    kernels, the autograd engine's thread state): tens of MB that do not grow with the model,
    batch or resolution. Warming them here puts them in the baseline, so the measured delta is
    the run's data, which is what the memory plan counts.
    """
    import torch
    from peft import LoraConfig

    from fluxkit.tiny.build import PRESETS, build_models
    from fluxkit.families.flux1 import FAMILY as FLUX1

    preset = PRESETS["tiny"]
    models = build_models(preset)
    t, vae, clip, t5 = models["transformer"], models["vae"], models["text_encoder"], models["text_encoder_2"]
    c = t.config
    tokens = 64
    for dtype, amp, lora in ((torch.float32, False, False), (torch.bfloat16, False, False), (torch.float32, True, False),
                             (torch.bfloat16, True, True)):
        for m in (t, vae, clip, t5):
            m.to(dtype)
        if lora and not getattr(t, "peft_config", None):
            t.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=list(FLUX1.lora_targets)))
        t.requires_grad_(True)
        opt = torch.optim.AdamW([p for p in t.parameters() if p.requires_grad])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            with torch.no_grad():
                vae.encode(torch.randn(1, 3, 32, 32, dtype=dtype))
                clip(torch.ones(1, 77, dtype=torch.long))
                t5(torch.ones(1, 77, dtype=torch.long))
            for checkpointing in (False, True):
                t.enable_gradient_checkpointing() if checkpointing else t.disable_gradient_checkpointing()
                out = t(hidden_states=torch.randn(1, tokens, c.in_channels, dtype=dtype),
                        encoder_hidden_states=torch.randn(1, 77, c.joint_attention_dim, dtype=dtype),
                        pooled_projections=torch.randn(1, c.pooled_projection_dim, dtype=dtype), timestep=torch.rand(1),
                        guidance=torch.ones(1), img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(77, 3), return_dict=False)[0]
                out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    del models, t, vae, clip, t5, opt, out


def main(argv: list[str]) -> int:
    out_prefix, script, *script_args = argv
    import accelerate
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import fluxkit.training.train  # noqa: F401

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        import deepspeed  # noqa: F401
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel  # noqa: F401
    from transformers import CLIPTextModel, T5EncoderModel  # noqa: F401

    warm_up_kernels()
    sampler = Sampler()
    gc.collect()
    baseline = sampler.sample()
    baseline_resident = sum(memory_status())
    sampler.start()

    prepare = accelerate.Accelerator.prepare

    def prepare_and_open(self, *args, **kwargs):
        sampler.before_prepare = sampler.sample()
        result = prepare(self, *args, **kwargs)
        sampler.window_open = True
        sampler.enter("train")
        return result

    accelerate.Accelerator.prepare = prepare_and_open

    steps = []

    def after_step(optimizer, args, kwargs):
        steps.append(sampler.sample() - baseline)
        sampler.loop_peak = sampler.window_peak

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(after_step)
    mark_phases(sampler)
    sys.argv = [script, *script_args]
    rc = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        rc = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    sampler.stopped.set()
    sampler.sample()
    rank = process_rank()
    with open(f"{out_prefix}.rank{rank}.json", "w") as f:
        json.dump({"baseline_bytes": baseline, "loop_peak_bytes": sampler.loop_peak, "run_peak_bytes": sampler.run_peak,
                   "before_prepare_bytes": getattr(sampler, "before_prepare", 0), "phase_peak_bytes": sampler.phase_peaks,
                   "baseline_resident_bytes": baseline_resident, "run_peak_resident_bytes": sampler.run_peak_resident,
                   "timeline": [(t, a - baseline, r - baseline_resident, p) for t, a, r, p in sampler.timeline],
                   "rc": rc, "rank": rank, "rss_after_steps": steps}, f)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
