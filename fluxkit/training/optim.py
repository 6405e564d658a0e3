"""The optimizer's and learning-rate schedule's flags (diffusers' names and defaults) and their
checks; models.build_optimizer builds the optimizer from them."""

from __future__ import annotations

import argparse

from ..shared.errors import UserError

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def _bool(value: str) -> bool:
    from ..shared.environment import parse_bool

    if parse_bool(value) is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return parse_bool(value)


def add_flags(g) -> None:
    g.add_argument("--learning_rate", type=float, default=1e-4, help="learning rate after warm-up")
    g.add_argument("--text_encoder_lr", type=float, default=5e-6, help="learning rate of the text encoder")
    g.add_argument("--scale_lr", action="store_true", help="scale lr by processes x accumulation x batch")
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="learning rate schedule")
    g.add_argument("--lr_warmup_steps", type=int, default=500, help="warm-up steps of the schedule")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="restarts for cosine_with_restarts")
    g.add_argument("--lr_power", type=float, default=1.0, help="power of the polynomial schedule")
    g.add_argument("--optimizer", default="AdamW", help="AdamW or prodigy")
    g.add_argument("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--prodigy_beta3", type=float, default=None, help="prodigy's beta3 (default sqrt(beta2))")
    g.add_argument("--prodigy_decouple", type=_bool, default=True, help="prodigy: decoupled weight decay")
    g.add_argument("--adam_weight_decay", type=float, default=1e-4)
    g.add_argument("--adam_weight_decay_text_encoder", type=float, default=1e-3)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--prodigy_use_bias_correction", type=_bool, default=True)
    g.add_argument("--prodigy_safeguard_warmup", type=_bool, default=True)


def validate(args) -> None:
    if args.learning_rate <= 0:
        raise UserError(f"--learning_rate {args.learning_rate} must be positive")
    if args.train_text_encoder and args.text_encoder_lr <= 0:
        raise UserError(f"--text_encoder_lr {args.text_encoder_lr} must be positive")
    if args.optimizer.lower() not in ("adamw", "prodigy"):
        raise UserError(f"--optimizer {args.optimizer!r} is not supported; use AdamW or prodigy")
