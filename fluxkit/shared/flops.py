"""FLOP accounting for the FLUX transformer, and the peak FLOP/s it is measured against.

Throughput numbers are only comparable across machines and settings when they are turned into
FLOPs per second and divided by what the device can do. This module is the one place that
knows both halves:

* `flux_forward_flops` counts one forward of `FluxTransformer2DModel` from its config: every
  matmul (multiply-add = 2 FLOPs) and the two attention matmuls (QK^T and PV). Element-wise
  work (norms, RoPE, activations, softmax) is not counted, like torch.utils.flop_counter.
* `training_step_flops` is the model-FLOPs convention: forward + backward = 3x forward.
  Recomputation from gradient checkpointing is not counted (it is overhead, not model work).
  With a frozen base (LoRA) no weight gradients are computed for the base matmuls, so the
  step is 2x their forward; attention has no weights and stays 3x. Adapter matmuls are not
  counted (2*rank/dim of an adapted layer: 1% at rank 16 on FLUX.1-dev), so LoRA MFU errs low.
* `peak_flops` is the peak of one device: a table of vendor dense-matmul figures for known
  accelerators, FLUXKIT_PEAK_TFLOPS to override, and on CPU a short all-core matmul
  measurement, cached on disk so that no script pays for it twice, shared by the processes.

The text encoders and the VAE are not counted: the trainers cache their outputs where exact,
and the transformer is where the time goes at any real resolution.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any, Mapping

from .errors import UserError
from .fsio import atomic_write_text
from .host_runtime import host_busy

PEAK_ENV = "FLUXKIT_PEAK_TFLOPS"
CACHE_ENV = "FLUXKIT_CACHE_DIR"

# diffusers hard-codes these in FluxTransformer2DModel's blocks (FeedForward mult=4,
# FluxSingleTransformerBlock mlp_ratio=4.0) and in the timestep projection (256 channels).
MLP_RATIO = 4
TIMESTEP_CHANNELS = 256


def _get(config: Any, key: str, default=None):
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def image_tokens(height: int, width: int, vae_scale_factor: int = 8) -> int:
    """Image tokens FLUX sees for an image: the VAE downsamples, then 2x2 latent patches are packed."""
    side = 2 * vae_scale_factor
    return (height // side) * (width // side)


def flux_forward_flop_parts(transformer_config: Any, image_tokens: int, text_tokens: int, batch: int = 1) -> dict:
    """FLOPs of one transformer forward, split into "linear" (weight matmuls) and "attention".

    transformer_config: FluxTransformer2DModel's config (`transformer.config`, or the dict it
    was built from). Counts follow diffusers' FluxTransformer2DModel layer by layer.
    """
    heads = int(_get(transformer_config, "num_attention_heads"))
    head_dim = int(_get(transformer_config, "attention_head_dim"))
    dim = heads * head_dim
    in_ch = int(_get(transformer_config, "in_channels"))
    out_ch = int(_get(transformer_config, "out_channels") or in_ch)
    patch = int(_get(transformer_config, "patch_size", 1) or 1)
    joint = int(_get(transformer_config, "joint_attention_dim"))
    pooled = int(_get(transformer_config, "pooled_projection_dim"))
    double = int(_get(transformer_config, "num_layers"))
    single = int(_get(transformer_config, "num_single_layers"))
    guidance = bool(_get(transformer_config, "guidance_embeds", False))
    n_img, n_txt = int(image_tokens), int(text_tokens)
    n = n_img + n_txt

    # Multiply-adds once per sample: time (and guidance) embedding MLPs, pooled-text MLP,
    # and the adaLN modulation linears (6*dim per double stream, 3*dim single, 2*dim final).
    per_sample = (1 + guidance) * (TIMESTEP_CHANNELS * dim + dim * dim) + (pooled * dim + dim * dim)
    per_sample += double * 2 * 6 * dim * dim + single * 3 * dim * dim + 2 * dim * dim
    # Multiply-adds per token: input/context embedders and the output projection ...
    per_token = n_img * in_ch * dim + n_txt * joint * dim + n_img * dim * patch * patch * out_ch
    # ... a double block: q, k, v, out (4 dim^2) + MLP (2 * ratio * dim^2), on each stream ...
    per_token += double * n * (4 + 2 * MLP_RATIO) * dim * dim
    # ... a single block: q, k, v (3 dim^2) + MLP in (ratio dim^2) + fused out ((1 + ratio) dim^2).
    per_token += single * n * (3 + MLP_RATIO + 1 + MLP_RATIO) * dim * dim
    # Attention over the joint sequence: QK^T and PV, n*n*head_dim multiply-adds per head each.
    attention = (double + single) * 2 * n * n * dim
    return {"linear": 2 * batch * (per_sample + per_token), "attention": 2 * batch * attention}


def flux2_forward_flop_parts(transformer_config: Any, image_tokens: int, text_tokens: int, batch: int = 1) -> dict:
    """flux_forward_flop_parts for Flux2Transformer2DModel: bias-free linears, SwiGLU MLPs of
    mlp_ratio x dim (gate and value halves), modulation shared by all blocks of a kind, no pooled text."""
    heads = int(_get(transformer_config, "num_attention_heads"))
    dim = heads * int(_get(transformer_config, "attention_head_dim"))
    ratio = float(_get(transformer_config, "mlp_ratio", 3.0))
    in_ch = int(_get(transformer_config, "in_channels"))
    out_ch = int(_get(transformer_config, "out_channels") or in_ch)
    joint = int(_get(transformer_config, "joint_attention_dim"))
    double, single = int(_get(transformer_config, "num_layers")), int(_get(transformer_config, "num_single_layers"))
    guidance = bool(_get(transformer_config, "guidance_embeds", False))
    channels = int(_get(transformer_config, "timestep_guidance_channels", TIMESTEP_CHANNELS))
    n_img, n_txt = int(image_tokens), int(text_tokens)
    n = n_img + n_txt
    # once per sample: time (and guidance) MLPs; modulation: 6 dim^2 per stream (double), 3 single, 2 final
    per_sample = (1 + guidance) * (channels * dim + dim * dim) + (2 * 6 + 3 + 2) * dim * dim
    per_token = n_img * in_ch * dim + n_txt * joint * dim + n_img * dim * out_ch
    # double block, each stream: q, k, v, out (4 dim^2) + SwiGLU in (2 ratio dim^2) and out (ratio dim^2)
    per_token += double * n * (4 + 3 * ratio) * dim * dim
    # single block: fused q, k, v + SwiGLU in ((3 + 2 ratio) dim^2), fused out ((1 + ratio) dim^2)
    per_token += single * n * (4 + 3 * ratio) * dim * dim
    attention = (double + single) * 2 * n * n * dim
    return {"linear": int(2 * batch * (per_sample + per_token)), "attention": 2 * batch * attention}


def flux_forward_flops(transformer_config: Any, image_tokens: int, text_tokens: int, batch: int = 1) -> int:
    """FLOPs of one FluxTransformer2DModel forward (matmuls and attention; multiply-add = 2 FLOPs)."""
    parts = flux_forward_flop_parts(transformer_config, image_tokens, text_tokens, batch)
    return parts["linear"] + parts["attention"]


def training_step_flops(transformer_config: Any, image_tokens: int, text_tokens: int, batch: int = 1,
                        frozen_base: bool = False, flop_parts=None) -> int:
    """Model FLOPs of one training micro-step of `batch` samples: forward + backward.

    3x forward when every weight trains. frozen_base=True (LoRA): base weight matmuls need
    input gradients only (2x), attention still needs both (3x); adapter FLOPs are left out.
    Gradient-checkpointing recomputation is never counted. flop_parts: the family's forward count
    (fluxkit.families: Family.flop_parts; FLUX.1's by default).
    """
    parts = (flop_parts or flux_forward_flop_parts)(transformer_config, image_tokens, text_tokens, batch)
    linear_factor = 2 if frozen_base else 3
    return linear_factor * parts["linear"] + 3 * parts["attention"]


def mfu(flops: float, seconds: float, peak: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation: `flops` done in `seconds` on `devices` devices of `peak` FLOP/s each."""
    if not peak or seconds <= 0 or devices <= 0:
        return None
    return flops / seconds / (peak * devices)


# ---------------------------------------------------------------- measured counts

def torch_counted_flops(transformer, image_tokens: int, text_tokens: int, batch: int = 1,
                        backward: bool = False, seed: int = 0) -> int:
    """FLOPs torch.utils.flop_counter counts for one forward (and backward) on random inputs.

    Attention runs on the math SDPA backend while counting: torch's counter has no formula for
    the fused CPU flash kernel, while the math path is plain bmm it counts exactly.
    With backward=True, gradients flow to whichever parameters have requires_grad.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = transformer.config
    param = next(transformer.parameters())
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(param.device, param.dtype)

    kwargs = dict(
        hidden_states=rand(batch, image_tokens, cfg.in_channels),
        encoder_hidden_states=rand(batch, text_tokens, cfg.joint_attention_dim),
        pooled_projections=rand(batch, cfg.pooled_projection_dim),
        timestep=torch.rand(batch, generator=gen).to(param.device, param.dtype),
        img_ids=torch.zeros(image_tokens, 3, device=param.device),
        txt_ids=torch.zeros(text_tokens, 3, device=param.device),
        return_dict=False,
    )
    if cfg.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), 3.5, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.set_grad_enabled(backward):
        out = transformer(**kwargs)[0]
        if backward:
            out.float().square().mean().backward()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------- device peaks

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' datasheets, TFLOP/s per
# device. Matched against the device name, most specific first. Anything else (including
# Ascend 910B SKUs, whose figures differ per SKU) needs FLUXKIT_PEAK_TFLOPS.
_HALF_PRECISION_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("Ascend910A", 256.0),  # first-generation Ascend 910 (Huawei, Hot Chips 2019), fp16
)


def _device_name(device_info) -> str:
    from .device import device_name

    return device_name(device_info) or platform.processor() or platform.machine()


def table_peak_flops(name: str, dtype) -> float | None:
    """The datasheet peak for a device name in bf16/fp16, or None when the name is not known."""
    import torch

    if dtype not in (torch.bfloat16, torch.float16):
        return None
    for key, tflops in _HALF_PRECISION_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


def measure_matmul_peak(device: str = "cpu", dtype=None, size: int = 1024, seconds: float = 0.5) -> float:
    """Best FLOP/s of square matmuls on `device` over about `seconds` (after one warm-up)."""
    import torch

    dtype = dtype or torch.bfloat16
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def sync():
        from .device import synchronize

        synchronize(device)

    torch.matmul(a, b)
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        sync()
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def _cache_path() -> str:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fluxkit")
    return os.path.join(root, "peak_flops.json")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_peak_flops(dtype) -> float:
    """The whole CPU's matmul peak (every core) in `dtype`, measured once per host and cached.

    Other work on the host can only slow a matmul down, so the cache keeps the best value
    seen, and a value measured on a busy host is measured again by the next caller that finds
    the host quiet. A file lock serialises concurrent callers (every rank of a multi-process
    run asks at the same moment): one measures while the others wait.
    """
    import torch

    cores = os.cpu_count() or 1
    key = f"cpu|{_cpu_model()}|cores={cores}|{str(dtype).replace('torch.', '')}|torch={torch.__version__}"
    path = _cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a+") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # no flock (Windows): concurrent measurements are merely less exact
            pass
        cache = {}
        if os.path.exists(path):
            try:
                with open(path) as f:
                    cache = json.load(f)
            except (OSError, ValueError):
                cache = {}  # a corrupt cache is re-measured, never fatal
        entry = cache.get(key) if isinstance(cache.get(key), dict) else None
        busy = host_busy()
        if entry is None or (not entry.get("quiet") and not busy):
            previous = torch.get_num_threads()
            torch.set_num_threads(cores)
            try:
                measured = measure_matmul_peak("cpu", dtype, size=2048, seconds=1.0)
            finally:
                torch.set_num_threads(previous)
            entry = {"flops": max(measured, float(entry["flops"]) if entry else 0.0), "quiet": not busy}
            cache[key] = entry
            atomic_write_text(path, json.dumps(cache, indent=1, sort_keys=True))
        return float(entry["flops"])


def local_processes() -> int:
    """Processes of this run on this host (torchrun/accelerate set LOCAL_WORLD_SIZE)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1))


def peak_flops(device_info, dtype) -> float | None:
    """Peak FLOP/s of ONE device of this kind in `dtype`, or None when it is not known.

    Order: FLUXKIT_PEAK_TFLOPS (TFLOP/s per device), the datasheet table for accelerators,
    on CPU the cached all-core matmul measurement divided by the processes of this run on
    this host: they share one CPU, and cores may be SMT siblings, so a per-thread-count
    measurement would overstate what each process can get.
    """
    override = os.environ.get(PEAK_ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            value = -1.0
        if value <= 0:
            raise UserError(f"{PEAK_ENV}={override!r} is not a positive number of TFLOP/s per device; fix or unset it")
        return value * 1e12
    if device_info.type == "cpu":
        return cpu_peak_flops(dtype) / local_processes()
    return table_peak_flops(_device_name(device_info), dtype)
