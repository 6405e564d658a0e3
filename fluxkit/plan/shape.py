"""The run a plan is made for, as plain numbers and switches (RunShape), read once from the
trainer's parsed flags and the launch (processes, ZeRO stage and offload, device type). Every
term of the plan (fluxkit.plan.terms) reads this, never the flags themselves."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..training import pivotal
from ..shared.errors import UserError
from ..weights.quant import refuse_for_full_finetune
from .architecture import default_lora_targets


@dataclass(frozen=True)
class RunShape:
    lora: bool = True
    quant: str = "none"  # --base_quantization of a LoRA base
    text_quant: str = "none"  # --text_encoder_quantization (bitsandbytes nf4 / int8) of the frozen text encoders
    rank: int = 4
    targets: tuple = ()  # LoRA module names
    train_clip: bool = False
    pivotal_tokens: int = 0  # --train_text_encoder_ti's new tokens (fluxkit.training.pivotal): their rows train
    pivotal_t5: bool = False  # ... in T5 too (--enable_t5_ti)
    mixed: str = "bf16"  # the mixed precision the run computes in ("no" = fp32)
    world: int = 1  # processes in the run
    zero_stage: int = 0  # 0 = no DeepSpeed
    offload_params: bool = False  # ZeRO-3 offload_param_device cpu
    offload_optimizer: bool = False  # ZeRO offload_optimizer_device cpu
    blocks_to_swap: int = 0  # transformer blocks kept in host memory (--blocks_to_swap)
    batch: int = 1  # micro batch, doubled with prior preservation
    resolution: int = 512
    seq_len: int = 512  # text tokens (T5's, Mistral3's, Qwen3's)
    references: int = 0  # reference images per sample (editing pairs: Kontext, FLUX.2), each as many tokens as the target
    checkpointing: bool = False
    optimizer: str = "adamw"  # adamw, adamw8bit or prodigy
    caching: bool = True  # latents and prompt embeddings come from the cache
    warm_cache: bool = False  # the cache already holds everything: no encoder loads at all
    text_on_host: bool = False  # the text encoders fill the cache on the host CPU (decided by the plan)
    samples: int | None = None  # training samples (cache entries), when the plan can see the data
    prompts: int | None = None
    offload_encoders: bool = False
    validates: bool = False  # a --validation_prompt renders images
    device: str = "cuda"

    @property
    def cb(self) -> int:
        """Bytes of the compute dtype."""
        return 2 if self.mixed in ("bf16", "fp16") else 4

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage > 0

    @property
    def parts(self) -> int:
        """How many ways ZeRO splits what it partitions (DDP replicates: 1)."""
        return self.world if self.deepspeed else 1

    @property
    def regime(self) -> str:
        return "fp32" if self.cb == 4 else ("deepspeed" if self.deepspeed else "autocast")

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"

    @property
    def mode(self) -> str:
        return "lora" if self.lora else "full"


def shape_from_args(args, world_size: int = 1, zero_stage: int = 0, device: str = "cuda",
                    offload: tuple[bool, bool] = (False, False), warm_cache: bool = False, arch=None) -> RunShape:
    """The RunShape of the trainer's settings `args` (a TrainConfig) launched on `world_size` processes
    with this ZeRO stage and (offload_params, offload_optimizer), for the architecture `arch` (its
    family's default LoRA targets; FLUX.1's without one)."""
    from ..data.pairs import editing_requested

    if zero_stage not in (0, 1, 2, 3):
        raise UserError(f"--zero_stage {zero_stage} must be 0 (no DeepSpeed), 1, 2 or 3")
    if world_size < 1:
        raise UserError(f"--num_processes {world_size} must be at least 1")
    lora, quant = args.lora, args.base_quantization
    if not lora:
        refuse_for_full_finetune(quant)
    layers = args.lora_layers
    targets = [t.strip() for t in layers.split(",") if t.strip()] if layers else default_lora_targets(arch)
    prior = args.with_prior_preservation
    images = _count_images(args)
    samples = images * args.repeats * (2 if prior else 1) if images is not None else None
    opt = args.optimizer.lower()
    return RunShape(
        lora=lora, quant=quant, text_quant=args.text_encoder_quantization, rank=args.rank if lora else 0, targets=tuple(targets), train_clip=args.train_text_encoder,
        pivotal_tokens=pivotal.planned_tokens(args), pivotal_t5=pivotal.planned_tokens(args) > 0 and bool(args.enable_t5_ti),
        mixed=args.mixed_precision or ("bf16" if zero_stage else "no"), world=world_size, zero_stage=zero_stage,
        offload_params=bool(offload[0]) and zero_stage == 3, offload_optimizer=bool(offload[1]) and zero_stage > 0,
        blocks_to_swap=args.blocks_to_swap,
        batch=args.train_batch_size * (2 if prior else 1), resolution=args.resolution, seq_len=args.max_sequence_length,
        references=1 if editing_requested(args) else 0,
        checkpointing=bool(args.gradient_checkpointing),
        optimizer="prodigy" if opt == "prodigy" else ("adamw8bit" if args.use_8bit_adam else "adamw"),
        caching=not args.no_cache, warm_cache=warm_cache,
        samples=samples, prompts=None if samples is None else (samples if args.caption_column else 1),
        offload_encoders=args.offload_encoders, validates=bool(args.validation_prompt), device=device)


def _count_images(args) -> int | None:
    """Training images per epoch (before --repeats), when the plan can see them."""
    from ..data.scan import IMAGE_EXTENSIONS

    from ..shared.errors import UserError
    from ..data.scan import kohya_concepts

    folder = args.instance_data_dir
    if folder and os.path.isdir(folder) and not args.dataset_name:
        try:
            concepts = kohya_concepts(folder, "--instance_data_dir", 1)
        except UserError:  # a layout the data scan refuses, in its own words
            return None
        if concepts:  # kohya-style N_prompt folders: each image N times (their repeats are the samples')
            return sum(repeats * len([f for f in os.listdir(os.path.join(folder, name)) if f.lower().endswith(IMAGE_EXTENSIONS)])
                       for name, repeats, _ in concepts)
        return len([f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)])
    return None
