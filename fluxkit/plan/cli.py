"""`python -m fluxkit.plan`: the plan of a run from the trainer's own flags (its parser, so a flag
means the same here as in the trainer), plus the launch (processes, ZeRO stage, offload)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..shared.errors import UserError, cli
from .architecture import read_architecture
from .phases import GiB, Plan, plan_memory

if TYPE_CHECKING:
    from ..training.train_args import TrainConfig


def _plan_flags(p) -> None:
    """The plan's own flags: the launch a run is planned for, and the command's outputs."""
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
    g.add_argument("--architecture", default=None,
                   help="plan a preset's architecture instead of the folder's: dev (FLUX.1-dev; with --model_family "
                        "flux2: FLUX.2 [dev]), 4b or 9b with --model_family flux2-klein")
    g.add_argument("--json", default=None, help="also write the plan as JSON to this file")
    g.add_argument("--calibrate", action="store_true", help="measure the activation constants on this CPU and compare")


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags (LoRA's included; no data needed) plus the plan's own: --help and the nearest
    flag to a misspelt one come from it."""
    from ..training.train_args import build_parser as trainer_parser

    p = trainer_parser(lora=True, need_data=False)
    p.prog = "python -m fluxkit.plan"
    p.description = ("Per-device memory of a training run, phase by phase, from the trainer's flags and the model's "
                     "configs (no weights are loaded). LoRA flags apply with --lora.")
    _plan_flags(p)
    return p


@dataclass(frozen=True)
class PlanRequest:
    """A plan to make: the trainer's settings (train_args.parse, checked as the trainer checks them) and
    the launch they run under."""
    config: TrainConfig
    num_processes: int = 1
    zero_stage: int | None = None
    zero_offload: bool = False
    warm_cache: bool = False
    architecture: str | None = None  # a tiny.py preset instead of the folder's configs
    json: str | None = None

    @property
    def zero(self) -> int:
        if self.zero_offload:
            return 3
        return self.zero_stage if self.zero_stage is not None else (2 if self.num_processes > 1 else 0)

    def plan(self, device: str, device_memory_bytes: int | None = None) -> Plan:
        arch = read_architecture(self.config.pretrained_model_name_or_path, self.architecture, self.config.model_family,
                                 self.config.text_encoder_out_layers)
        return plan_memory(self.config, self.num_processes, self.zero, device, device_memory_bytes, arch,
                           offload=(self.zero_offload, self.zero_offload), warm_cache=self.warm_cache)


def parse(argv, parser=None) -> PlanRequest:
    """The plan's flags read apart from the trainer's, which train_args.parse reads and checks as the
    trainer does (the LoRA trainer's with --lora), without requiring the data."""
    from ..shared.errors import FlagParser
    from ..training.train_args import lora_only_flags
    from ..training.train_args import parse as parse_trainer

    argv = list(argv)
    combined = parser or build_parser()
    combined.parse_args(argv)  # --help; a misspelt flag named with the nearest of the trainer's and the plan's
    own = FlagParser(add_help=False)
    _plan_flags(own)
    mine, rest = own.parse_known_args(argv)  # an abbreviation the combined parser took is unique: the same here
    if not mine.lora:
        lora_only = lora_only_flags()
        for arg in rest:
            flag = arg.split("=", 1)[0]
            named = [o for o in combined._option_string_actions if o == flag] or \
                [o for o in combined._option_string_actions if flag.startswith("--") and o.startswith(flag)]
            if len(named) == 1 and named[0] in lora_only:
                raise UserError(f"{named[0]} is a flag of the LoRA trainer; add --lora to plan a LoRA run")
    settings = {k: v for k, v in vars(mine).items() if k not in ("lora", "calibrate")}
    return PlanRequest(parse_trainer(rest, lora=mine.lora, need_data=False), **settings)


def device_of(args) -> str:
    if args.device != "auto":
        return args.device
    if args.device_memory_gb:
        return "cuda"  # a stated device size: plan for an accelerator
    from ..shared.device import detect

    return detect("auto").type


@cli
def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--calibrate" in argv:
        from .calibrate import calibrate

        return calibrate()
    req = parse(argv, parser)
    args = req.config
    plan = req.plan(device_of(args), int(args.device_memory_gb * GiB) if args.device_memory_gb else None)
    print(plan.table())
    print(plan.one_line())
    if plan.fits is False:
        from .fit import remedies

        print(f"to fit: {remedies(plan, args)}")
    if req.json:
        from ..shared.fsio import atomic_write_json

        atomic_write_json(req.json, plan.to_json())
    return 0 if plan.fits is not False else 1
