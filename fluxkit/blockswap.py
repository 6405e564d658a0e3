"""--blocks_to_swap N (kohya's name): the last N transformer blocks keep their frozen weights in host
memory and visit the device only while they run."""

from __future__ import annotations

from .errors import UserError


def check_flags(args) -> None:
    """Refuse, in one line, what block swapping cannot serve."""
    n = args.blocks_to_swap
    if n < 0:
        raise UserError(f"--blocks_to_swap {n} must be 0 or more")
    if not getattr(args, "lora", False):
        raise UserError(f"--blocks_to_swap {n} swaps frozen weights, and a full fine-tune trains every weight; for the "
                        "full fine-tune use DeepSpeed ZeRO-3 with CPU offload (pretrain_bf16_zero3_offload_accelerate_config.yaml)")
    if not args.gradient_checkpointing:
        raise UserError(f"--blocks_to_swap {n} needs --gradient_checkpointing (backward would otherwise keep every "
                        "block's weights alive on the device); add it")
