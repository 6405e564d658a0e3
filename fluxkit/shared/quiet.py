"""Known library noise, silenced where it is made, one named message at a time.

Each entry below is a message that tells a user of this toolkit nothing they can act on, matched
on the logger (or warning category) that emits it and a fixed piece of its text; nothing else from
those loggers is touched, and no error is ever hidden. FLUXKIT_VERBOSE=1 (the launchers'
--verbose) keeps everything.
"""

from __future__ import annotations

import logging
import os
import warnings

from .environment import env_flag

VERBOSE_ENV = "FLUXKIT_VERBOSE"
# set by the launchers, which report the trainer's summary themselves (its one JSON line would repeat it)
LAUNCHER_ENV = "FLUXKIT_LAUNCHER"

# logger name -> pieces of messages it emits that are noise here
LOG_NOISE = {
    # torchvision is deliberately absent (it does not import beside our torch); the PIL image
    # processors transformers falls back to are what we want anyway
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
    # `.to(dtype)` on a model that has no fp32-only modules: an empty list, nothing to keep
    "diffusers.models.modeling_utils": ("that should be kept in float32: []",),
    # a LoRA that adapts the transformer only (the default) has no text-encoder keys, as it should
    "diffusers.loaders.lora_base": ("No LoRA keys associated to CLIPTextModel found",),
    "diffusers.loaders.peft": ("No LoRA keys associated to CLIPTextModel found",),
    # torchao and bitsandbytes (--base_quantization) are imported by transformers and peft whenever
    # they are installed, quantized run or not; on a CPU host they report GPU kernels they cannot load
    "torchao": ("Failed to load ",),
    "torchao.kernel.intmm": ("Detected no triton",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # --text_encoder_quantization int8: LLM.int8 quantizes its inputs from fp16, and says so at every call
    "bitsandbytes.autograd._functions": ("MatMul8bitLt: inputs will be cast from",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported by torch.compile",),
    # we load torchao-quantized models from safetensors weights only, never torchao's pickled tensors
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
}
# (category, regex matched at the start of the message)
WARNING_NOISE = (
    # DeepSpeed's ZeRO calls the old name; nothing for a user to change
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\._all_gather_base` is a private function"),
    (FutureWarning, r"`torch\.distributed\._reduce_scatter_base` is a private function"),
)
# loggers whose INFO lines repeat for every checkpoint (saving states, weights, RNG): warnings stay
CHATTY_AT_INFO = ("accelerate.checkpointing", "accelerate.accelerator")


class _DropMessages(logging.Filter):
    def __init__(self, pieces: tuple[str, ...]):
        super().__init__()
        self.pieces = pieces

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        return not any(piece in message for piece in self.pieces)


def install(verbose: bool | None = None) -> bool:
    """Silence the known noise in this process unless verbose; returns whether it did."""
    if verbose is None:
        verbose = env_flag(VERBOSE_ENV)
    if verbose:
        return False
    for name, pieces in LOG_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(pieces))
    for category, message in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in CHATTY_AT_INFO:
        logging.getLogger(name).setLevel(logging.WARNING)
    if os.environ.get("LOCAL_RANK", "0") not in ("", "0"):
        _one_set_of_progress_bars()
    return True


def _one_set_of_progress_bars() -> None:
    """transformers' and diffusers' bars ("Loading weights", pipeline components) only from the
    machine's first process: every other process would draw the same bars again."""
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
