"""Command-line flags of the trainers: diffusers' FLUX DreamBooth flags (same names, meanings and
defaults), LoRA's extra flags, and a few of ours. Validation of values lives here too.

`parse(argv, lora)` is the one reader of a trainer's flags: it returns a TrainConfig, a frozen
dataclass whose fields are the parser's flags (an attribute per flag, under the flag's name), so
the trainers, the launcher, `python -m fluxkit.cache` and everything they call read one value,
checked once. A change to a setting is a new config (dataclasses.replace), never an edit.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..data import buckets, dataset as data
from .. import families
from . import offload, optim, pivotal
from ..weights import quant
from ..cache.facade import add_flags as cache_flags
from ..shared.errors import FlagParser, UserError

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


def build_parser(lora: bool, need_data: bool = True) -> argparse.ArgumentParser:
    """Every flag of a trainer, each concern adding its own: the one parser through which the trainers,
    the launcher and the plan and cache commands read a trainer's flags (need_data: see parse)."""
    kind = "DreamBooth-LoRA" if lora else "full DreamBooth"
    p = FlagParser(
        description=f"{kind} fine-tuning of a FLUX model (FLUX.1, Kontext, FLUX.2 [klein] or [dev]: the family read "
                    "from the folder). Accepts the flags of diffusers' "
                    f"{'train_dreambooth_lora_flux.py' if lora else 'train_dreambooth_flux.py'}; run it with "
                    "`accelerate launch` (DeepSpeed ZeRO-2 bf16 via pretrain_bf16_accelerate_config.yaml) or plain python.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _model_flags(p.add_argument_group("model"))
    g = p.add_argument_group("data")
    data.add_flags(g, lora, need_prompt=need_data)
    buckets.add_flags(g)
    cache_flags(g)
    g = p.add_argument_group("training")
    _training_flags(g, lora)
    offload.add_flags(g)
    _resource_flags(g)
    optim.add_flags(p.add_argument_group("optimizer"))
    _validation_flags(p.add_argument_group("validation and logging"))
    if lora:
        _lora_flags(p.add_argument_group("LoRA"))
        pivotal.add_flags(p)
    return p


def _model_flags(g) -> None:
    g.add_argument("--pretrained_model_name_or_path", required=True, help="FLUX pipeline folder or hub id")
    g.add_argument("--model_family", default=None, choices=families.NAMES,
                   help="(ours) the FLUX family to train (default: read from the folder's model_index.json); "
                        "kontext trains a FLUX.1 folder as FLUX.1 Kontext")
    g.add_argument("--text_encoder_out_layers", type=int, nargs="+", default=None,
                   help="FLUX.2: the text encoder's hidden-state layers concatenated per token (default: the "
                        "family pipeline's: 10 20 30 for FLUX.2 [dev], 9 18 27 for [klein])")
    g.add_argument("--revision", default=None, help="hub revision of the model")
    g.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    g.add_argument("--cache_dir", default=None, help="where downloaded models and datasets are cached")
    quant.add_flag(g, "LoRA only: quantize the frozen transformer base")
    quant.add_text_encoder_flag(g, "the cache keeps their embeddings apart from unquantized ones")


def _training_flags(g, lora: bool) -> None:
    g.add_argument("--output_dir", default="flux-dreambooth-lora" if lora else "flux-dreambooth", help="where weights, checkpoints and logs go")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible training")
    g.add_argument("--train_text_encoder", action="store_true", help="also train the CLIP text encoder (T5 stays frozen)")
    g.add_argument("--train_batch_size", type=int, default=4, help="batch size per device (micro batch)")
    g.add_argument("--sample_batch_size", type=int, default=4, help="batch size when generating class images")
    g.add_argument("--num_train_epochs", type=int, default=1, help="epochs (ignored when --max_train_steps is given)")
    g.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps; overrides --num_train_epochs")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save a resumable checkpoint every N steps")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest', a checkpoint-STEP name inside --output_dir, or a checkpoint folder")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="(ours) start over in an --output_dir that holds another run: it moves to OUTPUT_DIR.old-TIME")
    g.add_argument("--allow_changed_settings", action="store_true",
                   help="(ours) resume although the checkpoint's run settings (learning rate, global batch, rank, model) differ")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro batches per optimizer step")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations to save memory")
    g.add_argument("--guidance_scale", type=float, default=3.5, help="guidance embedding value for guidance-distilled FLUX.1-dev")
    g.add_argument("--weighting_scheme", default="none", choices=WEIGHTING_SCHEMES, help="timestep sampling and loss weighting")
    g.add_argument("--logit_mean", type=float, default=0.0, help="mean for logit_normal")
    g.add_argument("--logit_std", type=float, default=1.0, help="std for logit_normal")
    g.add_argument("--mode_scale", type=float, default=1.29, help="scale for the mode weighting scheme")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
    g.add_argument("--allow_tf32", action="store_true",
                   help="faster, slightly less exact fp32 matmuls: TF32 on Ampere+ GPUs; on CPUs with bf16 units, "
                        "oneDNN's bf16-based fp32 path (docs/performance.md)")
    g.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"), help="overrides accelerate's setting")
    g.add_argument("--prior_generation_precision", default=None, choices=("no", "fp32", "fp16", "bf16"), help="dtype for class image generation")
    g.add_argument("--local_rank", type=int, default=-1,
                   help="accepted for compatibility with diffusers' scripts; unused (accelerate sets LOCAL_RANK)")
    g.add_argument("--enable_npu_flash_attention", action="store_true", help="fused attention on Ascend NPUs (needs torch_npu)")
    g.add_argument("--device", default="auto", choices=("auto", "npu", "cuda", "cpu"), help="(ours) device; auto = npu > cuda > cpu")


def _resource_flags(g) -> None:
    """Memory: block offload and the memory plan; throughput reporting."""
    g.add_argument("--blocks_to_swap", type=int, default=0,
                   help="(ours, kohya's name) keep the last N transformer blocks' frozen weights in host memory; each "
                        "visits the device only while it runs (LoRA, with --gradient_checkpointing; see docs/memory.md)")
    g.add_argument("--ignore_memory_plan", action="store_true",
                   help="(ours) start even when the memory plan (fluxkit.plan) says the run does not fit the device")
    g.add_argument("--device_memory_gb", type=float, default=None,
                   help="(ours) memory of one device in GiB for the memory plan's fit check (default: detected; on a "
                        "CPU the host's RAM shared by its processes)")
    g.add_argument("--throughput_warmup_steps", type=int, default=2, help="(ours) optimizer steps left out of the throughput figures")
    g.add_argument("--log_every", type=int, default=100,
                   help="(ours) log throughput every N optimizer steps (the progress bar shows loss and lr every step)")


def _validation_flags(g) -> None:
    g.add_argument("--validation_prompt", default=None, help="prompt rendered every --validation_epochs")
    g.add_argument("--num_validation_images", type=int, default=4, help="images per validation")
    g.add_argument("--validation_epochs", type=int, default=50, help="validate every N epochs")
    g.add_argument("--num_validation_steps", type=int, default=28, help="(ours) denoising steps for validation images")
    g.add_argument("--logging_dir", default="logs", help="tensorboard folder inside --output_dir")
    g.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none")
    g.add_argument("--push_to_hub", action="store_true", help="upload the result (needs network access)")
    g.add_argument("--hub_token", default=None, help="hub token (never logged)")
    g.add_argument("--hub_model_id", default=None, help="hub repository name")


def _lora_flags(g) -> None:
    g.add_argument("--rank", type=int, default=4, help="LoRA rank")
    g.add_argument("--lora_alpha", type=int, default=4, help="LoRA alpha (scale = alpha / rank)")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout")
    g.add_argument("--lora_layers", default=None,
                   help="comma-separated module names to adapt, e.g. 'attn.to_k,attn.to_q,attn.to_v,attn.to_out.0' (default: all attention and MLP linears)")
    g.add_argument("--cache_latents", action="store_true",
                   help="accepted for compatibility with diffusers' script; latents are always cached (see --no_cache)")
    g.add_argument("--upcast_before_saving", action="store_true", help="save LoRA weights in fp32 (default: training dtype)")


def trainer_flags(lora: bool) -> dict[str, argparse.Action]:
    """The trainer's flags by name (without --): what a launcher key may be."""
    flags = {}
    for action in build_parser(lora)._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and opt != "--help":
                flags[opt[2:]] = action
    return flags


def _field_type(action: argparse.Action):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return bool
    if action.nargs not in (None, "?"):
        return list | None
    return (action.type if action.type in (int, float, str) else str if action.type is None else Any) | None


def _config_class():
    """TrainConfig: a field per flag of the LoRA trainer (the full trainer's flags are a subset) and `lora`."""
    actions = [a for a in build_parser(lora=True)._actions if a.dest != "help"]
    fields = [(a.dest, _field_type(a)) for a in actions] + [("lora", bool)]
    cls = dataclasses.make_dataclass("TrainConfig", fields, frozen=True)
    cls.__module__ = __name__  # Python 3.11 has no module= yet: pickling and repr name this module
    cls.__doc__ = "A trainer's settings, one attribute per flag (see build_parser); made by parse()."
    return cls, {a.dest: a.default for a in actions}


TrainConfig, _LORA_DEFAULTS = _config_class()
# the full fine-tune has no LoRA flags: their values there (attribute access stays uniform)
_FULL_FINETUNE_LORA_VALUES = {"rank": None, "lora_alpha": None, "lora_dropout": 0.0, "lora_layers": None,
                              "upcast_before_saving": False}


def lora_only_flags() -> set[str]:
    """The LoRA trainer's flags the full fine-tune does not take (--rank, ...), with their --."""
    return {f"--{name}" for name in set(trainer_flags(True)) - set(trainer_flags(False))}


def parse(argv=None, lora: bool = False, need_data: bool = True) -> TrainConfig:
    """The trainer's flags, read by its parser and checked (validate): a mistake is one error line.
    need_data=False: a run described without its data (python -m fluxkit.plan, which counts the images
    when it is shown them): no data source or --instance_prompt is required; every other check holds."""
    given = vars(build_parser(lora, need_data=need_data).parse_args(argv))
    values = {**_LORA_DEFAULTS, **({} if lora else _FULL_FINETUNE_LORA_VALUES), **given, "lora": lora}
    config = TrainConfig(**values)
    validate(config, need_data)
    return config


def validate(args, need_data: bool = True) -> None:
    """Reject impossible values before anything heavy starts: one line naming the flag and the fix."""
    if need_data and args.dataset_name is None and args.instance_data_dir is None:
        raise UserError("give --instance_data_dir (a folder of images) or --dataset_name (a dataset with images)")
    if args.resolution <= 0 or args.resolution % 16:
        raise UserError(f"--resolution {args.resolution} must be a positive multiple of 16 (FLUX packs 2x2 latents of an 8x VAE)")
    for flag in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "repeats", "sample_batch_size",
                 "checkpointing_steps", "validation_epochs", "num_validation_images"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag} {getattr(args, flag)} must be a positive integer")
    if args.max_train_steps is not None and args.max_train_steps <= 0:
        raise UserError(f"--max_train_steps {args.max_train_steps} must be a positive integer")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit <= 0:
        raise UserError(f"--checkpoints_total_limit {args.checkpoints_total_limit} must be a positive integer")
    optim.validate(args)
    data.validate(args)
    buckets.validate(args)
    if args.device_memory_gb is not None and args.device_memory_gb <= 0:
        raise UserError(f"--device_memory_gb {args.device_memory_gb} must be positive (GiB of one device)")
    if not 1 <= args.max_sequence_length <= 512:
        raise UserError(f"--max_sequence_length {args.max_sequence_length} must be between 1 and 512 (T5's limit)")
    if args.with_prior_preservation:
        if not args.class_prompt:
            raise UserError("--with_prior_preservation needs --class_prompt (e.g. 'a photo of dog')")
        if not args.class_data_dir:
            raise UserError("--with_prior_preservation needs --class_data_dir (a folder; missing class images are generated there)")
    if not args.lora:
        quant.refuse_for_full_finetune(args.base_quantization)
    quant.refuse_trained_text_encoder(args.text_encoder_quantization,
                                      args.train_text_encoder or bool(args.train_text_encoder_ti))
    if args.lora:
        if args.rank <= 0 or args.lora_alpha <= 0:
            raise UserError(f"--rank {args.rank} and --lora_alpha {args.lora_alpha} must be positive")
        if not 0.0 <= args.lora_dropout < 1.0:
            raise UserError(f"--lora_dropout {args.lora_dropout} must be in [0, 1)")
    pivotal.validate(args)
    if args.blocks_to_swap:
        from .blockswap import check_flags

        check_flags(args)
    if args.report_to not in ("tensorboard", "wandb", "all", "none"):
        raise UserError(f"--report_to {args.report_to!r} must be tensorboard, wandb, all or none")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        from ..checkpoint import resume_path

        if resume_path(args.output_dir, args.resume_from_checkpoint) is None:
            raise UserError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is neither a checkpoint inside "
                            f"--output_dir {args.output_dir!r} nor a folder; give 'latest', a checkpoint-STEP name or a path")
