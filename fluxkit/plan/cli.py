"""`python -m fluxkit.plan`: the plan of a run from the trainer's own flags (its parser, so a flag
means the same here as in the trainer), plus the launch (processes, ZeRO stage, offload)."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError, cli
from .phases import GiB, plan_memory


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags (LoRA's included) plus the plan's own."""
    from ..train_args import build_parser as trainer_parser

    p = trainer_parser(lora=True)
    p.prog = "python -m fluxkit.plan"
    p.description = ("Per-device memory of a training run, phase by phase, from the trainer's flags and the model's "
                     "configs (no weights are loaded). LoRA flags apply with --lora.")
    for action in p._actions:  # the plan needs no data or prompt
        if action.dest in ("instance_prompt",):
            action.required = False
    g = p.add_argument_group("memory plan")
    g.add_argument("--lora", action="store_true", help="plan train_flux_dreambooth_lora.py (default: the full fine-tune)")
    g.add_argument("--num_processes", type=int, default=1, help="processes (devices) in the run")
    g.add_argument("--zero_stage", type=int, default=None,
                   help="DeepSpeed ZeRO stage (0 = no DeepSpeed); default 2 with several processes, else 0")
    g.add_argument("--zero_offload", action="store_true",
                   help="ZeRO-3 with parameters and optimizer states in host memory "
                        "(pretrain_bf16_zero3_offload_accelerate_config.yaml); implies --zero_stage 3")
    g.add_argument("--warm_cache", action="store_true",
                   help="the cache already holds every latent and prompt (python -m fluxkit.cache): no encoder loads")
    g.add_argument("--architecture", default=None, help="plan a tiny.py preset's architecture (dev = FLUX.1-dev) instead of the folder's")
    g.add_argument("--json", default=None, help="also write the plan as JSON to this file")
    g.add_argument("--calibrate", action="store_true", help="measure the activation constants on this CPU and compare")
    p.set_defaults(max_sequence_length=None)  # the full and LoRA trainers differ: filled in by parse()
    return p


def parse(argv, parser=None) -> argparse.Namespace:
    """The plan's flags; defaults the two trainers disagree on (T5 tokens) follow --lora."""
    from ..train_args import build_parser as trainer_parser

    args = (parser or build_parser()).parse_args(argv)
    if args.max_sequence_length is None:
        args.max_sequence_length = trainer_parser(lora=args.lora).get_default("max_sequence_length")
    return args


def check(args) -> None:
    if args.resolution <= 0 or args.resolution % 16:
        raise UserError(f"--resolution {args.resolution} must be a positive multiple of 16")
    if args.train_batch_size <= 0:
        raise UserError(f"--train_batch_size {args.train_batch_size} must be a positive integer")
    if args.device_memory_gb is not None and args.device_memory_gb <= 0:
        raise UserError(f"--device_memory_gb {args.device_memory_gb} must be positive (GiB of one device)")
    if args.blocks_to_swap:
        from ..blockswap import check_flags

        check_flags(args)


def device_of(args) -> str:
    if args.device != "auto":
        return args.device
    if args.device_memory_gb:
        return "cuda"  # a stated device size: plan for an accelerator
    from ..device import detect

    return detect("auto").type


@cli
def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--calibrate" in argv:
        from .calibrate import calibrate

        return calibrate()
    args = parse(argv, parser)
    check(args)
    zero = 3 if args.zero_offload else (args.zero_stage if args.zero_stage is not None else (2 if args.num_processes > 1 else 0))
    memory = int(args.device_memory_gb * GiB) if args.device_memory_gb else None
    plan = plan_memory(args, args.num_processes, zero, device_of(args), memory,
                       offload=(args.zero_offload, args.zero_offload))
    print(plan.table())
    print(plan.one_line())
    if plan.fits is False:
        from .fit import remedies

        print(f"to fit: {remedies(plan, args)}")
    if args.json:
        from ..fsio import atomic_write_json

        atomic_write_json(args.json, plan.to_json())
    return 0 if plan.fits is not False else 1
