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

from . import families, pivotal, quant
from .data import INTERPOLATION_MODES
from .errors import FlagParser, UserError

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def build_parser(lora: bool) -> argparse.ArgumentParser:
    kind = "DreamBooth-LoRA" if lora else "full DreamBooth"
    p = FlagParser(
        description=f"{kind} fine-tuning of FLUX.1. Accepts the flags of diffusers' "
                    f"{'train_dreambooth_lora_flux.py' if lora else 'train_dreambooth_flux.py'}; run it with "
                    "`accelerate launch` (DeepSpeed ZeRO-2 bf16 via pretrain_bf16_accelerate_config.yaml) or plain python.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument

    g = p.add_argument_group("model")
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

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None, help="a local dataset folder, parquet file or hub id with images and captions")
    g.add_argument("--dataset_config_name", default=None, help="dataset config (hub datasets only)")
    g.add_argument("--instance_data_dir", default=None, help="folder of instance images (used when --dataset_name is not given)")
    g.add_argument("--image_column", default="image", help="image column of --dataset_name")
    g.add_argument("--caption_column", default=None, help="caption column of --dataset_name (else --instance_prompt for all)")
    g.add_argument("--repeats", type=int, default=1, help="how many times to repeat the training data")
    g.add_argument("--instance_prompt", default=None, required=True, help="prompt with the identifier of the instance, e.g. 'a photo of sks dog'")
    g.add_argument("--class_data_dir", default=None, help="folder of class images for prior preservation (filled up when short)")
    g.add_argument("--class_prompt", default=None, help="prompt for class images, e.g. 'a photo of dog'")
    g.add_argument("--num_class_images", type=int, default=100, help="class images wanted; missing ones are generated with the base model")
    g.add_argument("--with_prior_preservation", action="store_true", help="add the prior-preservation loss")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="weight of the prior-preservation loss")
    g.add_argument("--resolution", type=int, default=512, help="training resolution (a multiple of 16)")
    g.add_argument("--center_crop", action="store_true", help="center crop (default: random crop)")
    g.add_argument("--random_flip", action="store_true", help="randomly flip images horizontally")
    g.add_argument("--image_interpolation_mode", default="lanczos", choices=INTERPOLATION_MODES, help="resize filter")
    g.add_argument("--max_sequence_length", type=int, default=512 if lora else 77,
                   help="T5 tokens per prompt (at most 512; upstream's defaults: 77 full, 512 LoRA)")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="DataLoader worker processes per process, which decode images (upstream's default 0; the "
                        "launchers' auto picks from the cores per process)")
    g.add_argument("--skip_bad_images", action="store_true", help="(ours) skip unreadable images with a count instead of stopping")
    g.add_argument("--caption_extension", default=".txt", help="(ours) caption file beside each image: IMAGE.txt")
    g.add_argument("--caption_dropout_rate", type=float, default=0.0, help="(ours) fraction of samples trained with the empty caption")
    g.add_argument("--alpha_background", default="white", help="(ours) colour transparent images are composited on (name or #rrggbb)")
    g.add_argument("--aspect_ratio_buckets", action="store_true",
                   help="(ours) train each image in the bucket nearest its aspect ratio (about resolution^2 pixels) instead of a square crop")
    g.add_argument("--bucket_step", type=int, default=64, help="(ours) bucket sides step by this many pixels (a multiple of 16)")
    g.add_argument("--min_bucket_side", type=int, default=None, help="(ours) shortest bucket side (default: half the resolution)")
    g.add_argument("--max_bucket_side", type=int, default=None, help="(ours) longest bucket side (default: twice the resolution)")
    g.add_argument("--latent_cache_dir", default=None,
                   help="(ours) persistent VAE latent / text embedding cache (default: OUTPUT_DIR's parent/.fluxkit-cache); "
                        "--cache_dir stays diffusers' download cache")

    g = p.add_argument_group("training")
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
    g.add_argument("--allow_tf32", action="store_true", help="allow TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"), help="overrides accelerate's setting")
    g.add_argument("--prior_generation_precision", default=None, choices=("no", "fp32", "fp16", "bf16"), help="dtype for class image generation")
    g.add_argument("--local_rank", type=int, default=-1,
                   help="accepted for compatibility with diffusers' scripts; unused (accelerate sets LOCAL_RANK)")
    g.add_argument("--enable_npu_flash_attention", action="store_true", help="fused attention on Ascend NPUs (needs torch_npu)")
    g.add_argument("--device", default="auto", choices=("auto", "npu", "cuda", "cpu"), help="(ours) device; auto = npu > cuda > cpu")
    g.add_argument("--no_cache", action="store_true", help="(ours) never cache latents or text embeddings (for comparisons)")
    g.add_argument("--offload_encoders", action="store_true",
                   help="(ours) keep the frozen text encoders and the VAE in host memory; they visit the device only while encoding")
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

    g = p.add_argument_group("optimizer")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="learning rate after warm-up")
    g.add_argument("--text_encoder_lr", type=float, default=5e-6, help="learning rate of the text encoder")
    g.add_argument("--scale_lr", action="store_true", help="scale lr by processes x accumulation x batch")
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="learning rate schedule")
    g.add_argument("--lr_warmup_steps", type=int, default=500, help="warm-up steps of the schedule")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="restarts for cosine_with_restarts")
    g.add_argument("--lr_power", type=float, default=1.0, help="power of the polynomial schedule")
    g.add_argument("--optimizer", default="AdamW", help="AdamW or prodigy")
    g.add_argument("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes (CUDA only)")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--prodigy_beta3", type=float, default=None, help="prodigy's beta3 (default sqrt(beta2))")
    g.add_argument("--prodigy_decouple", type=_bool, default=True, help="prodigy: decoupled weight decay")
    g.add_argument("--adam_weight_decay", type=float, default=1e-4)
    g.add_argument("--adam_weight_decay_text_encoder", type=float, default=1e-3)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--prodigy_use_bias_correction", type=_bool, default=True)
    g.add_argument("--prodigy_safeguard_warmup", type=_bool, default=True)

    g = p.add_argument_group("validation and logging")
    g.add_argument("--validation_prompt", default=None, help="prompt rendered every --validation_epochs")
    g.add_argument("--num_validation_images", type=int, default=4, help="images per validation")
    g.add_argument("--validation_epochs", type=int, default=50, help="validate every N epochs")
    g.add_argument("--num_validation_steps", type=int, default=28, help="(ours) denoising steps for validation images")
    g.add_argument("--logging_dir", default="logs", help="tensorboard folder inside --output_dir")
    g.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none")
    g.add_argument("--push_to_hub", action="store_true", help="upload the result (needs network access)")
    g.add_argument("--hub_token", default=None, help="hub token (never logged)")
    g.add_argument("--hub_model_id", default=None, help="hub repository name")

    if lora:
        g = p.add_argument_group("LoRA")
        g.add_argument("--rank", type=int, default=4, help="LoRA rank")
        g.add_argument("--lora_alpha", type=int, default=4, help="LoRA alpha (scale = alpha / rank)")
        g.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout")
        g.add_argument("--lora_layers", default=None,
                       help="comma-separated module names to adapt, e.g. 'attn.to_k,attn.to_q,attn.to_v,attn.to_out.0' (default: all attention and MLP linears)")
        g.add_argument("--cache_latents", action="store_true",
                       help="accepted for compatibility with diffusers' script; latents are always cached (see --no_cache)")
        g.add_argument("--upcast_before_saving", action="store_true", help="save LoRA weights in fp32 (default: training dtype)")
        pivotal.add_flags(p)
    return p


def trainer_flags(lora: bool) -> dict[str, argparse.Action]:
    """The trainer's flags by name (without --): what a launcher key may be."""
    flags = {}
    for action in build_parser(lora)._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and opt != "--help":
                flags[opt[2:]] = action
    return flags


def _bool(value: str) -> bool:
    from .environment import parse_bool

    if parse_bool(value) is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return parse_bool(value)


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


def parse(argv=None, lora: bool = False) -> TrainConfig:
    """The trainer's flags, read by its parser and checked (validate): a mistake is one error line."""
    given = vars(build_parser(lora).parse_args(argv))
    values = {**_LORA_DEFAULTS, **({} if lora else _FULL_FINETUNE_LORA_VALUES), **given, "lora": lora}
    config = TrainConfig(**values)
    validate(config)
    return config


parse_args = parse  # diffusers' scripts' name for it


def validate(args) -> None:
    """Reject impossible values before anything heavy starts: one line naming the flag and the fix."""
    if args.dataset_name is None and args.instance_data_dir is None:
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
    if args.learning_rate <= 0:
        raise UserError(f"--learning_rate {args.learning_rate} must be positive")
    if args.train_text_encoder and args.text_encoder_lr <= 0:
        raise UserError(f"--text_encoder_lr {args.text_encoder_lr} must be positive")
    validate_data_flags(args)
    if args.device_memory_gb is not None and args.device_memory_gb <= 0:
        raise UserError(f"--device_memory_gb {args.device_memory_gb} must be positive (GiB of one device)")
    if not 1 <= args.max_sequence_length <= 512:
        raise UserError(f"--max_sequence_length {args.max_sequence_length} must be between 1 and 512 (T5's limit)")
    if args.optimizer.lower() not in ("adamw", "prodigy"):
        raise UserError(f"--optimizer {args.optimizer!r} is not supported; use AdamW or prodigy")
    if args.with_prior_preservation:
        if not args.class_prompt:
            raise UserError("--with_prior_preservation needs --class_prompt (e.g. 'a photo of dog')")
        if not args.class_data_dir:
            raise UserError("--with_prior_preservation needs --class_data_dir (a folder; missing class images are generated there)")
    if not args.lora:
        quant.refuse_for_full_finetune(args.base_quantization)
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
        from .checkpoint import resume_path

        if resume_path(args.output_dir, args.resume_from_checkpoint) is None:
            raise UserError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is neither a checkpoint inside "
                            f"--output_dir {args.output_dir!r} nor a folder; give 'latest', a checkpoint-STEP name or a path")


def validate_data_flags(args) -> None:
    from .buckets import make_buckets
    from .data import parse_color

    if args.dataloader_num_workers < 0:
        raise UserError(f"--dataloader_num_workers {args.dataloader_num_workers} must be 0 or more")
    if not 0.0 <= args.caption_dropout_rate < 1.0:
        raise UserError(f"--caption_dropout_rate {args.caption_dropout_rate} must be in [0, 1)")
    if not args.caption_extension.startswith(".") or len(args.caption_extension) < 2:
        raise UserError(f"--caption_extension {args.caption_extension!r} must look like .txt")
    parse_color(args.alpha_background)
    if args.aspect_ratio_buckets:
        make_buckets(args.resolution, args.bucket_step, args.min_bucket_side, args.max_bucket_side)
