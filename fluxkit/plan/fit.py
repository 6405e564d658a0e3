"""Does the plan fit the device, and if not, the smallest change that makes it fit.

check_fits is the pre-flight of the launchers and the trainers; smallest_change re-plans the run
with the changes a user can make, cheapest first (gradient checkpointing, a quantized base, a
cache filled on the host, N transformer blocks swapped to host memory, 8-bit Adam, ZeRO-3, ZeRO-3
with CPU offload), and names the first set that fits.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

from ..shared.errors import UserError
from .architecture import read_architecture
from .phases import GiB, HEADROOM_FRACTION, Plan, plan_memory, plan_shape

ZERO3_CONFIG = "pretrain_bf16_zero3_accelerate_config.yaml"
ZERO3_OFFLOAD_CONFIG = "pretrain_bf16_zero3_offload_accelerate_config.yaml"


def device_memory_bytes(device_info, processes_per_host: int = 1) -> int | None:
    """Memory one process may use: the accelerator's total, or on CPU the host's RAM shared by
    its processes. None when it cannot be told."""
    from ..shared.device import total_memory_bytes

    try:
        if device_info.has_accelerator:
            return total_memory_bytes(device_info)
        import psutil

        return int(psutil.virtual_memory().total // max(1, processes_per_host))
    except Exception:  # a broken driver must not stop a launch: the plan is advice
        return None


def launched_zero_stage() -> int:
    """The ZeRO stage `accelerate launch` set up for this process (0 without DeepSpeed), read from the
    environment it exports, so a trainer can plan before its Accelerator exists."""
    from ..shared.device import zero_stage

    return zero_stage() or 0


def launched_offload() -> tuple[bool, bool]:
    """(parameters, optimizer) offloaded to the CPU by the DeepSpeed config accelerate launched with."""
    from ..shared.device import zero_stage

    if zero_stage() is None:
        return False, False
    zero = _deepspeed_json().get("zero_optimization", {})
    param = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE") or (zero.get("offload_param") or {}).get("device")
    opt = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE") or (zero.get("offload_optimizer") or {}).get("device")
    return str(param).lower() in ("cpu", "nvme"), str(opt).lower() in ("cpu", "nvme")


def accelerate_offload(config: dict) -> tuple[bool, bool]:
    """(parameters, optimizer) offloaded to the CPU by an accelerate config file's DeepSpeed section
    (or the DeepSpeed JSON it names, given as deepspeed_config_file_contents)."""
    if config.get("distributed_type") != "DEEPSPEED":
        return False, False
    ds_json = config.get("deepspeed_config_file_contents")
    if ds_json is not None:
        zero = ds_json.get("zero_optimization") or {}
        param, opt = (zero.get("offload_param") or {}).get("device"), (zero.get("offload_optimizer") or {}).get("device")
    else:
        ds = config.get("deepspeed_config") or {}
        param, opt = ds.get("offload_param_device"), ds.get("offload_optimizer_device")
    return str(param).lower() in ("cpu", "nvme"), str(opt).lower() in ("cpu", "nvme")


def _deepspeed_json() -> dict:
    try:
        with open(os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")) as f:  # a DeepSpeed JSON holds the stage instead
            return json.load(f)
    except (TypeError, OSError, ValueError):
        return {}


def _changes(plan: Plan) -> list[list[tuple]]:
    """Kinds of change in the order they are tried, each a list of (flag text, shape -> shape)
    alternatives, smallest first."""
    s, kinds = plan.shape, []
    if not s.checkpointing:
        kinds.append([("--gradient_checkpointing", lambda x: replace(x, checkpointing=True))])
    if s.lora and s.quant in ("none", "int8"):
        quant = [] if s.deepspeed or s.quant == "int8" else ["int8"]  # int8 is refused under DeepSpeed (fluxkit.weights.quant)
        kinds.append([(f"--base_quantization {q}", lambda x, q=q: replace(x, quant=q)) for q in quant + ["nf4"]])
    if s.optimizer == "adamw" and not s.on_cpu:
        kinds.append([("--use_8bit_adam", lambda x: replace(x, optimizer="adamw8bit"))])
    if s.text_quant == "none" and not (s.train_clip or s.pivotal_tokens or s.warm_cache) and s.device != "npu":
        # bitsandbytes quantizes the frozen text encoders (fluxkit.weights.quant; no NPU backend)
        kinds.append([(f"--text_encoder_quantization {q}", lambda x, q=q: replace(x, text_quant=q)) for q in ("int8", "nf4")])
    if s.caching and not s.warm_cache:
        kinds.append([("the cache filled first on the host (python -m fluxkit.cache [same flags] --device cpu)",
                       lambda x: replace(x, warm_cache=True))])
    if s.lora and not s.deepspeed:
        also = "" if s.checkpointing else " --gradient_checkpointing"
        kinds.append([(f"--blocks_to_swap {n}{also}", lambda x, n=n: replace(x, blocks_to_swap=n, checkpointing=True))
                      for n in range(max(1, s.blocks_to_swap + 1), len(plan.arch.block_params) - 1)])
    if not s.lora and s.world > 1 and s.zero_stage != 3:
        kinds.append([(f"ZeRO-3 ({ZERO3_CONFIG})", lambda x: replace(x, zero_stage=3))])
    if not s.lora and not s.offload_params:
        kinds.append([(f"ZeRO-3 with CPU offload ({ZERO3_OFFLOAD_CONFIG})", lambda x: replace(
            x, zero_stage=3, offload_params=True, offload_optimizer=True, mixed="bf16" if x.cb == 4 else x.mixed))])
    return [k for k in kinds if k]


def smallest_change(plan: Plan) -> tuple[list[str], Plan] | None:
    """The first set of changes (cheapest kind first, the smallest alternative of each: block counts as
    small as they can be) whose plan fits plan.device_memory_bytes: (flags, that plan), or None. A kind
    that does not fit alone is kept (its strongest alternative) only when it lowers the peak; once a set
    fits, each earlier change it no longer needs is dropped again."""
    if plan.shape is None or not plan.device_memory_bytes:
        return None
    replan = lambda shape: plan_shape(shape, plan.arch, plan.device_memory_bytes,  # noqa: E731
                                      plan.summary["processes_per_host"])
    apply = lambda changes: _apply(plan.shape, [c for _, c in changes])  # noqa: E731
    chosen, peak = [], plan.peak_bytes
    for options in _changes(plan):
        for option in options:
            trial = replan(apply(chosen + [option]))
            if trial.fits:
                return _prune(chosen + [option], replan, apply)
        trial = replan(apply(chosen + [options[-1]]))
        if trial.peak_bytes < peak:
            chosen.append(options[-1])
            peak = trial.peak_bytes
    return None


def _apply(shape, changes):
    for change in changes:
        shape = change(shape)
    return shape


def _prune(chosen: list, replan, apply) -> tuple[list[str], Plan]:
    for option in list(chosen[:-1]):
        rest = [c for c in chosen if c is not option]
        if replan(apply(rest)).fits:
            chosen = rest
    return [text for text, _ in chosen], replan(apply(chosen))


def remedies(plan: Plan, args=None) -> str:
    """What to change for this run to fit, as one clause for the refusal line."""
    found = smallest_change(plan)
    if found:
        flags, fitting = found
        return f"{' + '.join(flags)} (plan {fitting.peak_bytes / GiB:.1f} GiB)"
    return "lower --train_batch_size or --resolution, or use a device with more memory"


def text_on_host(plan: Plan | None) -> bool:
    """Whether the run should encode its prompts on the host CPU, as its plan decided (fluxkit.training.train)."""
    return bool(plan is not None and plan.shape is not None and plan.shape.text_on_host)


def check_fits(args, world_size: int, zero_stage: int, device_info, processes_per_host: int | None = None,
               model_dir: str | None = None, ignore: bool | None = None,
               offload: tuple[bool, bool] | None = None) -> tuple[Plan | None, str]:
    """The pre-flight of the launchers and the trainers: (the plan, the line to show for it).

    args: the trainer's parsed flags (train_args.parse); world_size: processes in the run;
    zero_stage: 0 without DeepSpeed, else its stage; device_info: fluxkit.shared.device.DeviceInfo;
    processes_per_host: processes on this machine (default world_size), which share a CPU host's
    memory; model_dir: the pipeline folder to read (default args.pretrained_model_name_or_path);
    offload: (parameters, optimizer) on the CPU under ZeRO (default: as accelerate launched).
    The device's memory is args.device_memory_gb when given, else detected.

    Raises UserError (one line: the plan's summary and the smallest change that fits) when the plan
    exceeds the device's usable memory, unless args.ignore_memory_plan (or `ignore`): then it comes
    back (plan.fits is False: show the line as a warning). Anything else that keeps the plan from
    being made (an unreadable config, a hub id with no local files, an unknown driver) never stops a
    run: the plan is advice, and it comes back as None with a line that says why.
    """
    ignore = args.ignore_memory_plan if ignore is None else ignore
    stated = args.device_memory_gb
    try:
        if stated:
            memory = int(stated * GiB)
        else:
            sharing = (processes_per_host or world_size) if device_info.type == "cpu" else 1
            memory = device_memory_bytes(device_info, sharing)
        arch = read_architecture(model_dir, family=args.model_family) if model_dir else None
        plan = plan_memory(args, world_size, zero_stage, device_info.type, memory, arch,
                           offload if offload is not None else launched_offload(), processes_per_host)
    except Exception as err:  # noqa: BLE001 - an unreadable config must not stop training
        return None, f"memory plan: unavailable ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
    if plan.fits is False:
        if not ignore:
            raise UserError(f"{plan.one_line()}; to fit: {remedies(plan, args)}; or run anyway with --ignore_memory_plan")
        return plan, f"{plan.one_line()}; going on anyway (--ignore_memory_plan)"
    return plan, plan.one_line()


__all__ = ["HEADROOM_FRACTION", "accelerate_offload", "check_fits", "text_on_host", "device_memory_bytes", "launched_offload", "launched_zero_stage",
           "remedies", "smallest_change"]
