"""What this host and launch can run, judged from a trainer's config before anything heavy starts:
one function for the launcher (before it starts any process) and the trainer (in every process,
before any weights load), so both refuse the same runs with the same line."""

from __future__ import annotations

import importlib.util

from ..weights import quant
from ..shared.device import check_mixed_precision
from ..shared.errors import UserError


def check_host(cfg, info, deepspeed: bool) -> None:
    """The precision on this device, a quantized base or text encoder under this launch, the optional
    packages the flags need, and NPU attention only on an NPU. info: fluxkit.shared.device.DeviceInfo; deepspeed:
    whether the launch runs DeepSpeed."""
    check_mixed_precision(info, cfg.mixed_precision)
    quant.check(cfg.base_quantization, info.type, deepspeed=deepspeed)
    quant.check_text_encoder(cfg.text_encoder_quantization, info.type)
    if cfg.use_8bit_adam:
        require("bitsandbytes", "--use_8bit_adam needs bitsandbytes; drop the flag or pip install bitsandbytes")
    if cfg.optimizer.lower() == "prodigy":
        require("prodigyopt", "--optimizer prodigy needs prodigyopt; pip install prodigyopt")
    if cfg.enable_npu_flash_attention and info.type != "npu":
        raise UserError("--enable_npu_flash_attention needs an Ascend NPU with torch_npu; drop the flag on this host")


def require(module: str, message: str) -> None:
    """A UserError with message when an optional package is not installed."""
    if importlib.util.find_spec(module) is None:
        raise UserError(message)
