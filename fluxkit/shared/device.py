"""The device layer: which accelerator we run on, what it can do, and the Accelerator for it.

Every script goes through here so that "npu > cuda > cpu" and the distributed backend are
decided in one place. torch_npu is imported only when it is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

from .errors import UserError

DEVICE_CHOICES = ("auto", "npu", "cuda", "cpu")
BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # "npu", "cuda" or "cpu"
    count: int  # devices visible on this host (1 for cpu)
    backend: str  # torch.distributed backend for this device type

    @property
    def has_accelerator(self) -> bool:
        return self.type != "cpu"

    def supports(self, mixed_precision: str) -> bool:
        """Whether this device can train/infer in the named precision ("no", "fp16", "bf16")."""
        if mixed_precision in ("no", "fp32", None):
            return True
        if self.type == "cpu":
            # CPU autocast runs bf16 everywhere torch does; fp16 matmuls are not supported well.
            return mixed_precision == "bf16"
        if self.type == "cuda" and mixed_precision == "bf16":
            return torch.cuda.is_bf16_supported()
        return mixed_precision in ("fp16", "bf16")


def _npu_module():
    """torch_npu if it is installed (importing it registers torch.npu), else None."""
    if importlib.util.find_spec("torch_npu") is None:
        return None
    try:
        return importlib.import_module("torch_npu")
    except Exception:  # a broken CANN install must not break CPU/GPU users
        return None


def npu_available() -> bool:
    if _npu_module() is None:
        return False
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


def _count(device_type: str) -> int:
    if device_type == "npu":
        return int(torch.npu.device_count())
    if device_type == "cuda":
        return int(torch.cuda.device_count())
    return 1


def detect(requested: str = "auto") -> DeviceInfo:
    """Pick npu, else cuda, else cpu; or check that the requested one is there."""
    requested = (requested or "auto").lower()
    if requested not in DEVICE_CHOICES:
        raise UserError(f"--device {requested!r} is not one of {', '.join(DEVICE_CHOICES)}")
    if requested == "auto":
        if npu_available():
            requested = "npu"
        elif torch.cuda.is_available():
            requested = "cuda"
        else:
            requested = "cpu"
    elif requested == "npu" and not npu_available():
        why = "torch_npu is not installed" if _npu_module() is None else "no NPU is visible"
        raise UserError(f"--device npu was asked for but {why}; install torch_npu and source CANN's set_env.sh, or use --device auto")
    elif requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU; use --device auto or cpu")
    return DeviceInfo(type=requested, count=_count(requested), backend=BACKENDS[requested])


def check_mixed_precision(info: DeviceInfo, mixed_precision: str | None) -> None:
    if mixed_precision and not info.supports(mixed_precision):
        raise UserError(
            f"--mixed_precision {mixed_precision} is not supported on {info.type}; "
            f"use {'bf16 or no' if info.type == 'cpu' else 'fp16 or no'}"
        )


def allow_fast_fp32_matmul(device_type: str) -> None:
    """--allow_tf32 (upstream's flag: speed over the last bits of fp32 matmuls): TF32 on CUDA GPUs; on
    a CPU, oneDNN's bfloat16-based fp32 matmuls where the CPU has bf16 units (torch's "medium"
    float32 matmul precision). Measured on this host's AVX512-BF16 CPU: a LoRA step 1.7x and a
    full fine-tune step 1.45x less CPU time, weights within 1.5e-6 of the exact path after 9 steps
    (docs/performance.md). Without the flag every matmul stays exact fp32."""
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    elif device_type == "cpu":
        torch.set_float32_matmul_precision("medium")


def torch_dtype(name: str | None) -> torch.dtype:
    table = {None: torch.float32, "no": torch.float32, "fp32": torch.float32, "float32": torch.float32,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise UserError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32")
    return table[name]


def zero_stage(source=None) -> int | None:
    """The DeepSpeed ZeRO stage of a run (0-3), or None without DeepSpeed. source: None for the
    environment `accelerate launch` exported to this process (before any Accelerator exists), an
    accelerate config (the dict read from its YAML, with a DeepSpeed JSON's contents under
    deepspeed_config_file_contents), or an Accelerator."""
    if source is None:
        return _stage_from_environment()
    if isinstance(source, dict):
        return _stage_from_config(source)
    if not str(getattr(source, "distributed_type", "")).endswith("DEEPSPEED"):
        return None
    plugin = getattr(getattr(source, "state", None), "deepspeed_plugin", None)
    return _whole_number((plugin.deepspeed_config.get("zero_optimization") or {}).get("stage", 0)) if plugin else 0


def _stage_from_environment() -> int | None:
    from .environment import parse_bool

    if parse_bool(os.environ.get("ACCELERATE_USE_DEEPSPEED", "").strip()) is not True:
        return None
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        return _whole_number(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")  # a DeepSpeed JSON holds the stage instead
    try:
        with open(config) as f:
            import json

            return _whole_number((json.load(f).get("zero_optimization") or {}).get("stage", 0))
    except (TypeError, OSError, ValueError, AttributeError):
        return 0


def _stage_from_config(config: dict) -> int | None:
    if config.get("distributed_type") != "DEEPSPEED":
        return None
    ds_json = config.get("deepspeed_config_file_contents")
    if ds_json is not None:
        return _whole_number((ds_json.get("zero_optimization") or {}).get("stage", 0))
    return _whole_number((config.get("deepspeed_config") or {}).get("zero_stage", 0))


def _whole_number(value) -> int:
    return int(value) if str(value).isdigit() else 0


def using_deepspeed() -> bool:
    """True when accelerate launch was told to use DeepSpeed (config file or flag)."""
    return zero_stage() is not None


def is_deepspeed(accelerator) -> bool:
    """True when this Accelerator (or anything with accelerate's distributed_type) runs DeepSpeed."""
    return zero_stage(accelerator) is not None


def process_group_handlers(info: DeviceInfo, handlers=None) -> list:
    """accelerate kwargs_handlers for this device: `handlers` plus, when several processes run
    on a host without an accelerator, the gloo backend.

    Without it accelerate sees a single process under DeepSpeed and DeepSpeed's batch-size
    check fails. On a CPU host under DeepSpeed it also skips DeepSpeed's shm comm op build
    (fluxkit/shared/host_runtime.py). Shared by build_accelerator and patch_flux's patch for unmodified scripts.
    """
    from accelerate.utils import InitProcessGroupKwargs

    handlers = list(handlers or [])
    if info.type == "cpu" and using_deepspeed():
        from .host_runtime import skip_deepspeed_shm_op

        skip_deepspeed_shm_op()  # training never uses it; building it costs a minute
    if info.type == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not any(isinstance(h, InitProcessGroupKwargs) for h in handlers):
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        _destroy_process_group_at_exit()
    return handlers


def end_training(accelerator) -> None:
    """accelerate's end_training (trackers finished, process group destroyed), except that a gloo
    group this module closes at exit is left to that: destroyed right after the run's last barrier,
    with the DDP model still alive, gloo's group was freed later by DDP's Reducer at a frame's end,
    and its destructor (holding the GIL) joined a gloo thread that was waiting for the GIL to free
    the tensors of that barrier's works: a rank hung at the end of a finished 2-process run (seen
    once in ~10 runs of a 2-process cache test; gdb: ~ProcessGroupGloo joining pt_gloo_runloop in
    take_gil, under ~Reducer)."""
    if getattr(_destroy_process_group_at_exit, "registered", False):
        for tracker in accelerator.trackers:
            tracker.finish()
    else:
        accelerator.end_training()


def _destroy_process_group_at_exit() -> None:
    """Tear gloo down while Python still runs: left to interpreter exit, its threads can abort a
    process that finished all its work ("terminate called without an active exception"). By then
    the run's frames, DDP's Reducer with them, are gone, and its last collectives long finished."""
    import atexit

    def destroy():
        import datetime

        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            try:  # no rank may close its connections while a peer still uses them
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            except Exception:  # a peer already died: nothing left to wait for
                pass
            dist.destroy_process_group()

    if not getattr(_destroy_process_group_at_exit, "registered", False):
        atexit.register(destroy)
        _destroy_process_group_at_exit.registered = True


def build_accelerator(info: DeviceInfo | None = None, **kwargs):
    """An accelerate.Accelerator for this device (see process_group_handlers for the backend)."""
    from accelerate import Accelerator

    info = info or detect()
    handlers = process_group_handlers(info, kwargs.pop("kwargs_handlers", None))
    if info.type == "cpu" and not using_deepspeed():
        kwargs.setdefault("cpu", True)
    return Accelerator(kwargs_handlers=handlers, **kwargs)


# ------------------------------------------------------------------ the device module: one dispatch
#
# torch.cuda and torch.npu (registered by torch_npu) offer the same calls; everything that needs one
# of them asks here, by device type (a DeviceInfo, a torch.device or its type's name).

def device_module(device):
    """torch.cuda or torch.npu for an accelerator, None for the CPU."""
    kind = getattr(device, "type", device)
    kind = str(kind).split(":")[0]
    return {"cuda": torch.cuda, "npu": getattr(torch, "npu", None)}.get(kind)


def synchronize(device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    module = device_module(device)
    if module is not None:
        module.synchronize()


def empty_cache(device) -> None:
    """Hand the caching allocator's unused blocks back to the device."""
    module = device_module(device)
    if module is not None:
        module.empty_cache()


def device_name(device) -> str | None:
    """The accelerator's product name, None for the CPU."""
    module = device_module(device)
    return module.get_device_name() if module is not None else None


def total_memory_bytes(device) -> int | None:
    """The first accelerator's memory, None for the CPU."""
    module = device_module(device)
    return int(module.get_device_properties(0).total_memory) if module is not None else None


def current_device(device_type: str) -> torch.device:
    """This process's device of a type (its current index on an accelerator)."""
    module = device_module(device_type)
    return torch.device(device_type, module.current_device()) if module is not None else torch.device("cpu")


def peak_memory_bytes(info: DeviceInfo) -> int:
    """Peak device memory on npu/cuda; peak resident set size of this process on cpu."""
    module = device_module(info)
    if module is not None:
        return int(module.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_memory(info: DeviceInfo) -> None:
    module = device_module(info)
    if module is not None:
        module.reset_peak_memory_stats()
