"""Named runtime patches that let unmodified diffusers FLUX scripts run on NPU, GPU and CPU.

Each patch has a name, a one-line reason, and a check that says whether it applies on this
machine and library versions (and why). Applying is idempotent: a replaced function carries a
marker, so a second apply (the runner, then the script's own `TorchPatcher.apply_patch()`)
changes nothing.
"""

from __future__ import annotations

import functools
import gc
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from ..shared.device import is_deepspeed
from .script_fixes import FIXES, SKIPPED

# Opt-in / opt-out switches. A value of "1" (or "true"/"yes") turns the switch on.
ENV_ROPE_FP32 = "FLUXKIT_ROPE_FP32"  # force float32 RoPE on every device
ENV_NO_GC_TUNING = "FLUXKIT_NO_GC_TUNING"  # keep Python's default gc thresholds
ENV_NPU_ATTENTION = "FLUXKIT_NPU_FLASH_ATTENTION"  # use torch_npu.npu_fusion_attention
NPU_ATTENTION_FLAG = "--enable_npu_flash_attention"  # the upstream scripts' flag asks for it too

GC_THRESHOLDS = (700, 50, 1000)  # the reference's values: fewer full collections in long training loops
FLOAT64_UNSUPPORTED = ("npu", "mps")  # devices without float64 kernels for RoPE
_MARK = "__fluxkit_patch__"


def _env_on(name: str) -> bool:
    from ..shared.environment import parse_bool

    return parse_bool(os.environ.get(name, "")) is True


def _replace(owner, attr: str, make: Callable, name: str) -> bool:
    """owner.attr = make(original), unless a fluxkit patch already replaced it. Returns True if replaced."""
    original = inspect.getattr_static(owner, attr)
    func = original.__func__ if isinstance(original, (staticmethod, classmethod)) else original
    if getattr(func, _MARK, None) == name:
        return False
    new = make(getattr(owner, attr))
    setattr(new, _MARK, name)
    setattr(owner, attr, new)
    return True


@dataclass
class Patch:
    name: str
    reason: str
    check: Callable[[], tuple[bool, str]]  # -> (applies here, why)
    install: Callable[[], None]

    def status(self) -> tuple[bool, str]:
        try:
            return self.check()
        except ImportError as err:  # a library the patch targets is missing
            return False, f"not applicable: {err}"

    def apply(self) -> tuple[bool, str]:
        applies, why = self.status()
        if applies:
            self.install()
        return applies, why


# ------------------------------------------------------------------ 1. ShardedTensor device

def preferred_device(self) -> torch.device:
    """ShardedTensor._get_preferred_device that knows hccl, and falls back to this host's device."""
    import torch.distributed as dist

    from ..shared.device import current_device, detect

    backend = str(dist.get_backend(self._process_group)).lower()
    by_backend = {"nccl": "cuda", "hccl": "npu", "gloo": "cpu"}
    return current_device(by_backend.get(backend) or detect().type)


def _sharded_tensor_check():
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor

    from ..shared.device import _npu_module

    if _npu_module() is None:
        return False, "not needed: torch_npu is not installed (nccl and gloo are handled by torch)"
    source = inspect.getsource(ShardedTensor._get_preferred_device)
    if "get_device_backend_map" in source:
        return False, f"not needed: torch {torch.__version__} maps hccl to the npu device itself"
    return True, f"torch {torch.__version__} sends non-nccl collectives to cuda; hccl needs the npu"


def _sharded_tensor_install():
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor

    _replace(ShardedTensor, "_get_preferred_device", lambda _orig: preferred_device, "npu-sharded-tensor-device")


# ------------------------------------------------------------------ 2. float32 RoPE

def rope_float32(ids: torch.Tensor, axes_dim, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FluxPosEmbed's (cos, sin) computed in float32 on the ids' device.

    The frequencies are computed in float64 on the CPU (a few dozen numbers) and only then
    moved: the remaining float32 rounding is in pos * freq and cos/sin, well under 1e-5
    relative for FLUX.1-dev's axes at 4096 image tokens.
    """
    pos = ids.float()
    cos_parts, sin_parts = [], []
    for i, dim in enumerate(axes_dim):
        exponents = torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim
        freqs = (1.0 / theta**exponents).to(device=ids.device, dtype=torch.float32)
        angles = torch.outer(pos[:, i], freqs)
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1))
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)


def _pos_embed_classes() -> list:
    """Every FluxPosEmbed class of the installed diffusers (it moved between modules)."""
    import importlib

    found = []
    for module in ("diffusers.models.transformers.transformer_flux", "diffusers.models.embeddings"):
        try:
            cls = getattr(importlib.import_module(module), "FluxPosEmbed", None)
        except ImportError:
            continue
        if cls is not None and cls not in found:
            found.append(cls)
    if not found:
        raise ImportError("the installed diffusers has no FluxPosEmbed")
    return found


def _diffusers_downcasts_rope(cls) -> bool:
    source = inspect.getsource(cls.forward)
    return "maybe_adjust_dtype_for_device" in source or "npu" in source


def _accelerator_without_float64() -> str | None:
    from ..shared.device import npu_available

    if npu_available():
        return "npu"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return None


def _rope_check():
    import diffusers

    classes = _pos_embed_classes()
    if _env_on(ENV_ROPE_FP32):
        return True, f"forced by {ENV_ROPE_FP32}=1"
    device = _accelerator_without_float64()
    handled = all(_diffusers_downcasts_rope(c) for c in classes)
    if device is None:
        about = "already computes it in float32 there" if handled else "would need this patch there"
        return False, f"not needed: float64 RoPE runs on cpu and cuda (on npu/mps diffusers {diffusers.__version__} {about})"
    if handled:
        return False, f"not needed: diffusers {diffusers.__version__} already computes RoPE in float32 on {device}"
    return True, f"diffusers {diffusers.__version__} computes RoPE in float64, which {device} lacks"


def _rope_install():
    forced = _env_on(ENV_ROPE_FP32)

    def make(original):
        @functools.wraps(original)
        def forward(self, ids):
            if forced or ids.device.type in FLOAT64_UNSUPPORTED:
                return rope_float32(ids, self.axes_dim, self.theta)
            return original(self, ids)

        return forward

    for cls in _pos_embed_classes():
        _replace(cls, "forward", make, "rope-float32")


# ------------------------------------------------------------------ 3. gc thresholds

def _gc_check():
    if _env_on(ENV_NO_GC_TUNING):
        return False, f"opted out by {ENV_NO_GC_TUNING}=1"
    return True, f"gc thresholds {GC_THRESHOLDS} (Python's default {(700, 10, 10)})"


def _gc_install():
    gc.set_threshold(*GC_THRESHOLDS)


# ------------------------------------------------------------------ 4. gloo for DeepSpeed on CPU

def _gloo_check():
    from ..shared.device import detect

    info = detect()
    if info.has_accelerator:
        return False, f"not needed: {info.type} uses {info.backend}"
    return True, "no accelerator: multi-process runs get the gloo backend so accelerate counts every process"


def _gloo_install():
    from accelerate import Accelerator

    from ..shared.device import detect, process_group_handlers

    def make(original):
        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            kwargs["kwargs_handlers"] = process_group_handlers(detect(), kwargs.get("kwargs_handlers"))
            original(self, *args, **kwargs)

        return __init__

    _replace(Accelerator, "__init__", make, "deepspeed-cpu-gloo")


# ------------------------------------------------------------------ 5. DeepSpeed-aware state hooks

class PopSafeList(list):
    """The `weights` list a save hook gets under DeepSpeed: empty (the engine saves weights
    itself), so upstream hooks' unconditional `weights.pop()` must not raise."""

    def pop(self, *args):
        return super().pop(*args) if self else None


def _hooks_check():
    import accelerate

    return True, f"accelerate {accelerate.__version__}: acts only under DeepSpeed (engine-wrapped models, empty weights)"


def _hooks_install():
    from accelerate import Accelerator

    from ..weights.lora import unwrap_model

    def make(original):
        @functools.wraps(original)
        def register_save_state_pre_hook(self, hook):
            accelerator = self

            def deepspeed_aware(models, weights, output_dir):
                if is_deepspeed(accelerator):
                    models = [unwrap_model(m) for m in models]
                    weights = PopSafeList(weights)
                return hook(models, weights, output_dir)

            return original(self, deepspeed_aware)

        return register_save_state_pre_hook

    _replace(Accelerator, "register_save_state_pre_hook", make, "deepspeed-state-hooks")


def sampler_batch_size(loaders) -> int | None:
    """The per-process batch size of DataLoaders built with batch_sampler= (their .batch_size is None):
    the samplers' own batch_size (diffusers' bucket samplers keep one), the largest if several."""
    found = [getattr(dl.batch_sampler, "batch_size", None) for dl in loaders
             if isinstance(dl, torch.utils.data.DataLoader) and dl.batch_size is None]
    sizes = [b for b in found if isinstance(b, int) and b > 0]
    return max(sizes) if sizes and len(sizes) == len(found) else None


def _batch_sampler_check():
    import accelerate

    return True, (f"accelerate {accelerate.__version__}: acts only under DeepSpeed with an 'auto' micro batch "
                  "and a loader built with batch_sampler=")


def _batch_sampler_install():
    from accelerate import Accelerator

    def make(original):
        @functools.wraps(original)
        def prepare(self, *args, **kwargs):
            plugin = getattr(self.state, "deepspeed_plugin", None) if is_deepspeed(self) else None
            if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
                size = sampler_batch_size(args)
                if size is not None:  # what accelerate would have read from loader.batch_size
                    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = size
            return original(self, *args, **kwargs)

        return prepare

    _replace(Accelerator, "prepare", make, "deepspeed-batch-sampler")


def _save_barrier_check():
    import accelerate

    return True, f"accelerate {accelerate.__version__}: acts only where save_state is collective (DeepSpeed, FSDP)"


def _save_barrier_install():
    from accelerate import Accelerator

    from .script_fixes import collective_checkpoint

    def make(original):
        @functools.wraps(original)
        def save_state(self, *args, **kwargs):
            if collective_checkpoint(self) and self.num_processes > 1:
                # every rank is here anyway; rank 0 finishes pruning before any rank creates checkpoint-N
                self.wait_for_everyone()
            return original(self, *args, **kwargs)

        return save_state

    _replace(Accelerator, "save_state", make, "checkpoint-save-barrier")


# ------------------------------------------------------------------ 6. NPU fused attention

NPU_BACKEND = "_native_npu"  # diffusers' AttentionBackendName for torch_npu.npu_fusion_attention


def _npu_attention_asked() -> bool:
    return _env_on(ENV_NPU_ATTENTION) or NPU_ATTENTION_FLAG in sys.argv


def _npu_attention_check():
    import diffusers

    from ..shared.device import _npu_module

    try:
        from diffusers.models.attention_dispatch import AttentionBackendName
    except ImportError:
        return False, f"not available: diffusers {diffusers.__version__} has no attention backends (needs >= 0.35)"
    if NPU_BACKEND not in {b.value for b in AttentionBackendName}:
        return False, f"not available: diffusers {diffusers.__version__} has no {NPU_BACKEND} attention backend"
    if _npu_module() is None:
        return False, "not needed: torch_npu is not installed"
    if not _npu_attention_asked():
        return False, f"not asked for: set {ENV_NPU_ATTENTION}=1 or pass {NPU_ATTENTION_FLAG}"
    return True, f"FLUX transformers use diffusers' {NPU_BACKEND} backend (torch_npu.npu_fusion_attention)"


def _npu_attention_install():
    from diffusers import FluxTransformer2DModel

    def make(original):
        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            self.set_attention_backend(NPU_BACKEND)

        return __init__

    _replace(FluxTransformer2DModel, "__init__", make, "npu-fused-attention")


# ------------------------------------------------------------------ 7. context parallelism without an accelerator

_CP_DEVICE_EXPR = "rank % torch.accelerator.device_count()"


def _cp_device_target():
    """(class, method) of the installed diffusers that picks the context-parallel device by
    `rank % torch.accelerator.device_count()`, or None when no method does any more."""
    from diffusers.models.modeling_utils import ModelMixin

    for name in ("_resolve_parallel_config", "enable_parallelism"):
        method = getattr(ModelMixin, name, None)
        if method is not None:
            func = inspect.unwrap(method)
            if getattr(method, _MARK, None) == "context-parallel-cpu-device" or _CP_DEVICE_EXPR in inspect.getsource(func):
                return ModelMixin, name
    return None


def _cp_device_check():
    import diffusers
    from diffusers.models.modeling_utils import ModelMixin

    if not hasattr(ModelMixin, "enable_parallelism"):
        return False, f"not available: diffusers {diffusers.__version__} has no context parallelism (needs >= 0.36)"
    if _cp_device_target() is None:
        return False, f"already handled: diffusers {diffusers.__version__} no longer divides by the accelerator count"
    count = torch.accelerator.device_count() if hasattr(torch, "accelerator") else 0
    if count > 0:
        return False, f"not needed: {count} accelerator(s) here, so rank % device_count is defined"
    return True, (f"diffusers {diffusers.__version__} computes {_CP_DEVICE_EXPR}, which divides by zero "
                  "without an accelerator; CPU processes count as one device while it runs")


def _cp_device_install():
    import contextlib

    owner, name = _cp_device_target()

    @contextlib.contextmanager
    def at_least_one_device():
        original = torch.accelerator.device_count
        torch.accelerator.device_count = lambda *a, **k: max(1, original(*a, **k))
        try:
            yield
        finally:
            torch.accelerator.device_count = original

    def make(original):
        @functools.wraps(original)
        def method(self, *args, **kwargs):
            with at_least_one_device():
                return original(self, *args, **kwargs)

        return method

    _replace(owner, name, make, "context-parallel-cpu-device")


# ------------------------------------------------------------------ 8. model offload without an accelerator

def _cpu_offload_check():
    from diffusers import DiffusionPipeline

    from ..shared.device import detect

    info = detect()
    if info.has_accelerator:
        return False, f"not needed: {info.type} is there to offload from"
    if not hasattr(DiffusionPipeline, "enable_model_cpu_offload"):
        return False, "not available: this diffusers has no enable_model_cpu_offload"
    return True, "no accelerator: enable_model_cpu_offload keeps the pipeline on the cpu instead of raising"


def _cpu_offload_install():
    from diffusers import DiffusionPipeline

    def make(original):
        @functools.wraps(original)
        def enable_model_cpu_offload(self, gpu_id=None, device=None):
            if device is None or torch.device(device).type == "cpu":
                return self.to("cpu")  # every model already lives where offloading would put it
            return original(self, gpu_id=gpu_id, device=device)

        return enable_model_cpu_offload

    _replace(DiffusionPipeline, "enable_model_cpu_offload", make, "cpu-model-offload")


# ------------------------------------------------------------------ 9. FLUX.2 inputs in the transformer's dtype

def _flux2_dtype_check():
    import diffusers

    try:
        from diffusers import Flux2Transformer2DModel  # noqa: F401
    except ImportError:
        return False, f"not available: diffusers {diffusers.__version__} has no FLUX.2 transformer"
    return True, ("acts only without autocast (DeepSpeed bf16/fp16) when the latents or prompt embeddings "
                  "are not in the transformer's dtype")


def _flux2_dtype_install():
    from diffusers import Flux2Transformer2DModel

    def make(original):
        @functools.wraps(original)
        def forward(self, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            dtype = self.x_embedder.weight.dtype
            if hidden_states.dtype != dtype and not torch.is_autocast_enabled(hidden_states.device.type):
                # what autocast does for the scripts' float32 latents; the pipelines pass them in this dtype
                hidden_states = hidden_states.to(dtype)
                if encoder_hidden_states is not None and encoder_hidden_states.is_floating_point():
                    encoder_hidden_states = encoder_hidden_states.to(dtype)
            return original(self, hidden_states, encoder_hidden_states, *args, **kwargs)

        return forward

    _replace(Flux2Transformer2DModel, "forward", make, "flux2-input-dtype")


# ------------------------------------------------------------------ 10. FLUX.2 [dev]'s processor without torchvision

def _pixtral_text_check():
    import transformers

    from ..families.pixtral_text import torchvision_available

    if torchvision_available():
        return False, "not needed: torchvision is installed, so transformers builds PixtralProcessor"
    if not hasattr(transformers, "Mistral3ForConditionalGeneration"):
        return False, f"not available: transformers {transformers.__version__} has no Mistral3 (FLUX.2 [dev]) model"
    return True, ("no torchvision: PixtralProcessor (FLUX.2 [dev]'s tokenizer folder) loads as its text half; "
                  "a prompt with an image still needs torchvision")


def _pixtral_text_install():
    import transformers

    from ..families.pixtral_text import PixtralTextProcessor

    # `from transformers import PixtralProcessor` and the pipelines' model_index.json lookup both read this attribute
    transformers.PixtralProcessor = PixtralTextProcessor


PATCHES = [
    Patch("npu-sharded-tensor-device", "ShardedTensor collectives must use the NPU (or the CPU when there is no accelerator)",
          _sharded_tensor_check, _sharded_tensor_install),
    Patch("rope-float32", "FluxPosEmbed's float64 RoPE fails where float64 is unsupported (npu, mps)",
          _rope_check, _rope_install),
    Patch("gc-thresholds", "fewer full garbage collections keep long training steps steady",
          _gc_check, _gc_install),
    Patch("deepspeed-cpu-gloo", "without an accelerator DeepSpeed needs gloo, else accelerate counts one process",
          _gloo_check, _gloo_install),
    Patch("deepspeed-state-hooks", "under DeepSpeed, save hooks get engine-wrapped models and an empty weights list",
          _hooks_check, _hooks_install),
    Patch("deepspeed-batch-sampler", "a DataLoader built with batch_sampler= (aspect buckets) has batch_size None, "
          "which accelerate's DeepSpeed prepare() refuses", _batch_sampler_check, _batch_sampler_install),
    Patch("checkpoint-save-barrier", "every rank's save_state creates checkpoint-N at once, so rank 0's pruning, still "
          "running, counts and deletes it and one checkpoint too many", _save_barrier_check, _save_barrier_install),
    Patch("npu-fused-attention", "torch_npu's fused attention is much faster than the composed one on NPU",
          _npu_attention_check, _npu_attention_install),
    Patch("context-parallel-cpu-device", "diffusers' enable_parallelism divides the rank by the accelerator count, "
          "0 on a CPU-only host (ZeroDivisionError)", _cp_device_check, _cp_device_install),
    Patch("flux2-input-dtype", "the FLUX.2 scripts feed float32 latents to the transformer and rely on autocast, "
          "which DeepSpeed's bf16 engine does not use (float != BFloat16)", _flux2_dtype_check, _flux2_dtype_install),
    Patch("cpu-model-offload", "the FLUX.2 scripts' validation calls enable_model_cpu_offload, which raises "
          "without an accelerator", _cpu_offload_check, _cpu_offload_install),
    Patch("pixtral-text-processor", "transformers builds FLUX.2 [dev]'s PixtralProcessor only with torchvision, "
          "though its prompts are text", _pixtral_text_check, _pixtral_text_install),
]
BY_NAME = {p.name: p for p in PATCHES}


_LEFT_OUT: set[str] = set()  # skipped once, skipped for the rest of the process


def apply(names=None, skip=()) -> list[tuple[str, bool, str]]:
    """Apply the named patches (default: all) where they apply; (name, applied, why) for each.

    A patch in skip is left out, and stays out for later calls in this process too: a script run by
    the runner with --skip NAME may call the reference's TorchPatcher.apply_patch() itself.
    """
    _LEFT_OUT.update(skip)
    chosen = [BY_NAME[n] for n in names] if names else PATCHES
    return [(p.name, False, SKIPPED) if p.name in _LEFT_OUT else (p.name, *p.apply()) for p in chosen]


def check_skip(skip) -> None:
    """One UserError for a --skip name that is neither a runtime patch nor a source fix (the nearest name in it)."""
    import difflib

    from ..shared.errors import UserError

    known = [*BY_NAME, *FIXES]
    for name in skip:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise UserError(f"--skip {name!r} is not a runtime patch or source fix of patch_flux.py; {hint}"
                            f"`python patch_flux.py --list` names them all")


def describe() -> list[tuple[str, bool, str, str]]:
    """(name, applies here, why, reason) for every patch, without applying anything."""
    return [(p.name, *p.status(), p.reason) for p in PATCHES]
