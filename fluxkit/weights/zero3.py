"""DeepSpeed ZeRO-3: what changes when the parameters themselves are sharded across processes.

Under ZeRO-3 (pretrain_bf16_zero3_accelerate_config.yaml) every process holds 1/N of each
trained model's parameters; a parameter's local tensor is an empty placeholder (shape 0) except
while DeepSpeed gathers it for a forward or backward pass. Three things follow:

- the frozen text encoders and the VAE must load whole: accelerate registers its DeepSpeed config
  with transformers, whose from_pretrained would otherwise partition CLIP and T5 (zero.Init)
  although no DeepSpeed engine ever gathers them again;
- reading weights (final save, the diffusers-format transformer in checkpoints, the LoRA file)
  gathers them first, one parameter at a time, so no device ever holds more than one full
  tensor beyond its shard. Gathering is a collective: every rank calls it, only rank 0 keeps
  the copies and writes;
- rendering validation images runs the sharded transformer, whose every layer gathers its
  parameters: all ranks render in lockstep and rank 0 writes (see outputs.run_validation).

DeepSpeed's own checkpoint (accelerate save_state) holds each rank's shard of the weights and of
the optimizer states, so resume is exact without any gathering.
"""

from __future__ import annotations

import contextlib

import torch

from ..shared.device import zero_stage
from ..shared.errors import UserError


def is_zero3(accelerator) -> bool:
    return zero_stage(accelerator) == 3


def check_supported(args, accelerator) -> None:
    """Refuse, in one line each, what cannot run under DeepSpeed here, before any model loads."""
    if zero_stage(accelerator) and args.train_text_encoder:
        raise UserError("--train_text_encoder cannot run under DeepSpeed: accelerate gives DeepSpeed one model per run "
                        "(the transformer), so CLIP would not train; drop the flag, or launch without a DeepSpeed config")


def host_optimizer(accelerator) -> bool:
    """Whether the optimizer step runs on the host as the trainer's own torch optimizer (ZeRO offload).

    A DeepSpeed config that offloads the optimizer (pretrain_bf16_zero3_offload_accelerate_config.yaml)
    makes accelerate swap the trainer's AdamW for DeepSpeed's CPU Adam, an op DeepSpeed compiles on first
    use (2.5 min on this 2-core host with a warm compiler cache, 7.5 min cold) in every new environment.
    torch's fused AdamW does the same step on the same host tensors without compiling anything, within
    about 20% of CPU Adam's time (docs/memory.md): unless the config says otherwise
    ("zero_force_ds_cpu_optimizer": true in a DeepSpeed JSON), the trainer keeps its own optimizer, fused."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return False
    config = plugin.deepspeed_config
    device = (config.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    if str(device).lower() not in ("cpu", "nvme"):
        return False
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    return not config["zero_force_ds_cpu_optimizer"]


@contextlib.contextmanager
def whole_models(accelerator):
    """Load models unpartitioned even under ZeRO-3 (the frozen encoders and VAE are no DeepSpeed
    engine; the transformer is partitioned when accelerate prepares it)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if not is_zero3(accelerator):
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # transformers' from_pretrained then sees no ZeRO-3 and skips zero.Init
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()  # re-register accelerate's config, as the plugin left it


def _partitioned(param) -> bool:
    return hasattr(param, "ds_id")  # DeepSpeed marks every ZeRO-3 parameter with its id


def gathered_parameters(params):
    """A context in which the given (possibly ZeRO-3 partitioned) parameters hold their full data
    on every rank; a no-op for ordinary parameters. Every rank must enter it (a collective)."""
    params = [p for p in params if _partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def full_state_dict(module: torch.nn.Module, main: bool) -> dict[str, torch.Tensor] | None:
    """The module's complete state dict as CPU copies on the main process (None elsewhere).

    Every rank must call it under ZeRO-3. Parameters are gathered one at a time, so a device holds
    its shard plus one full tensor; buffers are never partitioned and are copied as they are.
    """
    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        with gathered_parameters([param]):
            if main:
                state[name] = param.detach().to("cpu", copy=True)
    if not main:
        return None
    persistent = module.state_dict(keep_vars=True).keys()  # state_dict leaves non-persistent buffers out
    for name, buffer in module.named_buffers():
        if name in persistent:
            state[name] = buffer.detach().to("cpu", copy=True)
    return state


def save_pretrained_gathered(module: torch.nn.Module, folder: str, main: bool) -> None:
    """module.save_pretrained(folder) with full weights, also when ZeRO-3 shards them.

    Every rank must call it. Without partitioned parameters the main process saves the module
    directly. Otherwise rank 0 puts the gathered CPU copies into an empty (meta-device) twin of
    the module and saves that: the weights exist once in host memory, in the library's own
    format (config, shards, index).
    """
    if not any(_partitioned(p) for p in module.parameters()):
        if main:
            module.save_pretrained(folder, safe_serialization=True)
        return
    state = full_state_dict(module, main)
    if not main:
        return
    with torch.device("meta"):
        twin = type(module).from_config(module.config)
    twin.load_state_dict(state, strict=True, assign=True)
    twin.save_pretrained(folder, safe_serialization=True)
