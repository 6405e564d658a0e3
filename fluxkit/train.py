"""The one training loop behind train_flux_dreambooth.py (full) and train_flux_dreambooth_lora.py.

Full and LoRA differ only in which parameters train (`Trainables`) and in how weights are saved;
data, flow-matching loss, caching, checkpoints, validation and throughput accounting are shared.
Read top to bottom: setup, data, optimizer, resume, loop, final save.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch

from . import checkpoints, flops
from .data import IMAGE_EXTENSIONS, DreamBoothDataset, EpochShuffleSampler, collate, list_images
from .device import build_accelerator, check_mixed_precision, detect, is_deepspeed, peak_memory_bytes, synchronize, torch_dtype
from .errors import UserError
from .lora import save_lora, lora_save_load_hooks, unwrap_model

logger = logging.getLogger("fluxkit.train")
PIPELINE_COMPONENTS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")
DEFAULT_LORA_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                        "ff_context.net.2", "proj_mlp", "proj_out"]
CLIP_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


# ------------------------------------------------------------------------------------------ models

@dataclass
class Models:
    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    vae: torch.nn.Module
    transformer: torch.nn.Module
    scheduler: object
    model_dir: str


def resolve_model_dir(args) -> str:
    """A local folder for --pretrained_model_name_or_path, checked component by component."""
    path = args.pretrained_model_name_or_path
    if not os.path.isdir(path):
        if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
            raise UserError(f"--pretrained_model_name_or_path {path!r} is not a FLUX pipeline folder; "
                            "give a local folder (make_tiny_flux.py builds one) or a hub id like black-forest-labs/FLUX.1-dev")
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, revision=args.revision, cache_dir=args.cache_dir,
                                     local_files_only=os.environ.get("HF_HUB_OFFLINE", "0") == "1")
        except Exception as err:
            raise UserError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path!r} could not be "
                            f"downloaded ({type(err).__name__}); download it first or give a local folder") from None
    missing = [c for c in PIPELINE_COMPONENTS if not os.path.isdir(os.path.join(path, c))]
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        missing.insert(0, "model_index.json")
    if missing:
        raise UserError(f"--pretrained_model_name_or_path {path!r} is missing {', '.join(missing)}; "
                        "point it at a complete FLUX pipeline folder")
    return path


def load_models(args, model_dir: str, weight_dtype: torch.dtype) -> Models:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    common = dict(revision=args.revision, local_files_only=True)
    try:
        models = Models(
            tokenizer=AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer", **common),
            tokenizer_2=AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer_2", **common),
            text_encoder=CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", variant=args.variant, **common),
            text_encoder_2=T5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder_2", variant=args.variant, **common),
            vae=AutoencoderKL.from_pretrained(model_dir, subfolder="vae", variant=args.variant, **common),
            transformer=FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer", variant=args.variant, **common),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler", **common),
            model_dir=model_dir,
        )
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the FLUX pipeline from {model_dir!r}: {str(err).splitlines()[0][:300]}") from None
    return models


@dataclass
class Trainables:
    """What trains: the whole transformer (full) or LoRA adapters; optionally the CLIP text encoder."""
    transformer_params: list
    text_encoder_params: list = field(default_factory=list)


def setup_trainables(args, m: Models, weight_dtype: torch.dtype) -> Trainables:
    for module in (m.vae, m.text_encoder_2, m.text_encoder, m.transformer):
        module.requires_grad_(False)
    # Frozen parts run in the compute dtype; trained full weights stay fp32 (masters for mixed precision).
    m.vae.to(dtype=weight_dtype)
    m.text_encoder_2.to(dtype=weight_dtype)
    if args.lora:
        from peft import LoraConfig

        targets = [t.strip() for t in args.lora_layers.split(",") if t.strip()] if args.lora_layers else DEFAULT_LORA_TARGETS
        m.transformer.to(dtype=weight_dtype)
        try:
            m.transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                                 init_lora_weights="gaussian", target_modules=targets))
            found = [n for n, p in m.transformer.named_parameters() if "lora" in n]
        except ValueError:  # peft's NoMatchingPeftModuleError: no module has any of these names
            found = []
        if not found:
            raise UserError(f"--lora_layers {args.lora_layers!r} matched no module of the transformer; "
                            "use names like attn.to_q,attn.to_k,attn.to_v,attn.to_out.0")
        _params_to_fp32(m.transformer)
        t_params = [p for p in m.transformer.parameters() if p.requires_grad]
        te_params = []
        if args.train_text_encoder:
            m.text_encoder.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                                  init_lora_weights="gaussian", target_modules=CLIP_LORA_TARGETS))
            _params_to_fp32(m.text_encoder)
            te_params = [p for p in m.text_encoder.parameters() if p.requires_grad]
        else:
            m.text_encoder.to(dtype=weight_dtype)
        return Trainables(t_params, te_params)
    m.transformer.requires_grad_(True)
    te_params = []
    if args.train_text_encoder:
        m.text_encoder.requires_grad_(True)
        te_params = list(m.text_encoder.parameters())
    else:
        m.text_encoder.to(dtype=weight_dtype)
    return Trainables(list(m.transformer.parameters()), te_params)


def _params_to_fp32(module: torch.nn.Module) -> None:
    for p in module.parameters():
        if p.requires_grad:
            p.data = p.data.float()


# ------------------------------------------------------------------------------------ text & latents

def encode_prompts(prompts: list[str], m: Models, max_sequence_length: int, device, text_encoder=None):
    """(T5 sequence embeddings (B, L, D), CLIP pooled embeddings (B, P)) for a list of prompts."""
    text_encoder = text_encoder if text_encoder is not None else m.text_encoder
    clip_ids = m.tokenizer(prompts, padding="max_length", max_length=m.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids.to(device)
    pooled = text_encoder(clip_ids, output_hidden_states=False).pooler_output
    t5_ids = m.tokenizer_2(prompts, padding="max_length", max_length=max_sequence_length,
                           truncation=True, return_tensors="pt").input_ids.to(device)
    seq = m.text_encoder_2(t5_ids, output_hidden_states=False)[0]
    return seq, pooled


class Cache:
    """Per-sample VAE latent distributions and per-prompt text embeddings, filled lazily.

    Keys are sample indices (class samples have negative keys) and prompt strings, never step
    numbers, so a shuffled loader can never pair a caption with another image's latents. Filling
    on first use spreads the encoding over the first epoch and over processes.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.latents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.text: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def latent_moments(self, keys: list[int], pixels: torch.Tensor, vae) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [i for i, k in enumerate(keys) if k not in self.latents] if self.enabled else list(range(len(keys)))
        fresh = {}
        if missing:
            with torch.no_grad():
                dist = vae.encode(pixels[missing].to(vae.device, dtype=vae.dtype)).latent_dist
            for j, i in enumerate(missing):
                fresh[i] = (dist.mean[j], dist.logvar[j])
                if self.enabled:
                    self.latents[keys[i]] = fresh[i]
        pairs = [fresh[i] if i in fresh else self.latents[k] for i, k in enumerate(keys)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def text_embeddings(self, prompts: list[str], m: Models, args, device):
        if not self.enabled:
            with torch.no_grad():
                return encode_prompts(prompts, m, args.max_sequence_length, device)
        todo = sorted({p for p in prompts if p not in self.text})
        if todo:
            with torch.no_grad():
                seq, pooled = encode_prompts(todo, m, args.max_sequence_length, device)
            for i, p in enumerate(todo):
                self.text[p] = (seq[i], pooled[i])
        return torch.stack([self.text[p][0] for p in prompts]), torch.stack([self.text[p][1] for p in prompts])


# ------------------------------------------------------------------------------- the flow-matching loss

def flow_matching_loss(args, m: Models, transformer, batch, cache: Cache, device, weight_dtype, text_encoder=None):
    """One micro batch: sample latents and noise, predict the velocity, weighted MSE (+ prior loss)."""
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    keys = batch["index"].tolist()
    mean, logvar = cache.latent_moments(keys, batch["pixel_values"], m.vae)
    # Sampled here (not inside the VAE) so cached and uncached runs draw the same random numbers.
    x0 = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
    cfg = m.vae.config
    x0 = ((x0 - cfg.shift_factor) * cfg.scaling_factor).to(weight_dtype)

    if text_encoder is not None:  # CLIP trains: pooled embeddings need gradients; T5 stays cached
        seq, _ = cache.text_embeddings(batch["prompts"], m, args, device)
        clip_ids = m.tokenizer(batch["prompts"], padding="max_length", max_length=m.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids.to(device)
        pooled = text_encoder(clip_ids).pooler_output
    else:
        seq, pooled = cache.text_embeddings(batch["prompts"], m, args, device)

    bsz, channels, h, w = x0.shape
    noise = torch.randn_like(x0)
    u = compute_density_for_timestep_sampling(weighting_scheme=args.weighting_scheme, batch_size=bsz,
                                              logit_mean=args.logit_mean, logit_std=args.logit_std, mode_scale=args.mode_scale)
    indices = (u * m.scheduler.config.num_train_timesteps).long().clamp(max=len(m.scheduler.timesteps) - 1)
    timesteps = m.scheduler.timesteps[indices].to(device)
    sigmas = m.scheduler.sigmas[indices].to(device, dtype=weight_dtype).view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise

    packed = FluxPipeline._pack_latents(noisy, bsz, channels, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(bsz, h // 2, w // 2, device, weight_dtype)
    txt_ids = torch.zeros(seq.shape[1], 3, device=device, dtype=weight_dtype)
    config = unwrap_model(transformer).config
    guidance = torch.full((bsz,), args.guidance_scale, device=device, dtype=weight_dtype) if config.guidance_embeds else None
    pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       pooled_projections=pooled.to(weight_dtype), encoder_hidden_states=seq.to(weight_dtype),
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    vae_scale = 2 ** (len(cfg.block_out_channels) - 1)
    pred = FluxPipeline._unpack_latents(pred, height=h * vae_scale, width=w * vae_scale, vae_scale_factor=vae_scale)

    weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
    per_sample = (weighting.float() * (pred.float() - (noise - x0).float()) ** 2).reshape(bsz, -1).mean(dim=1)
    is_class = batch["is_class"].to(device)
    loss = per_sample[~is_class].mean()
    if is_class.any():
        loss = loss + args.prior_loss_weight * per_sample[is_class].mean()
    return loss


# ------------------------------------------------------------------------------------ throughput

class Throughput:
    """images/s = micro batch x processes x accumulation / optimizer-step wall time, after warm-up."""

    def __init__(self, images_per_step: int, warmup: int, flops_per_step: float | None, peak_flops: float | None, device_info):
        self.images_per_step, self.warmup = images_per_step, warmup
        self.flops_per_step, self.peak_flops, self.info = flops_per_step, peak_flops, device_info
        self.times: list[float] = []
        self.seen = 0
        self.last = None

    def record(self, seconds: float) -> None:
        self.seen += 1
        self.last = seconds
        if self.seen > self.warmup:
            self.times.append(seconds)

    def summary(self) -> dict:
        sec = sum(self.times) / len(self.times) if self.times else float("nan")
        mfu = flops.mfu(self.flops_per_step, sec, self.peak_flops) if self.flops_per_step and self.times else None
        return {"images_per_sec": self.images_per_step / sec if self.times else None,
                "sec_per_step": sec if self.times else None, "measured_steps": len(self.times),
                "step_seconds": [round(t, 6) for t in self.times],  # per-step spread for bench/
                "mfu": mfu, "peak_memory_gb": peak_memory_bytes(self.info) / 2**30}


def _flops_and_peak(args, m: Models, device_info, weight_dtype, per_process_images: int):
    """Model FLOPs of one optimizer step on one process, and that device's peak FLOP/s (or None)."""
    from .flops import image_tokens, peak_flops, training_step_flops

    vae_scale = 2 ** (len(m.vae.config.block_out_channels) - 1)
    tokens = image_tokens(args.resolution, args.resolution, vae_scale)
    step_flops = training_step_flops(m.transformer.config, tokens, args.max_sequence_length, batch=per_process_images,
                                     frozen_base=args.lora)
    return step_flops, peak_flops(device_info, weight_dtype)


# ------------------------------------------------------------------------------------ main entry

def train(args) -> dict:
    e2e_start = time.perf_counter()
    run_type = "lora" if args.lora else "full"
    info = detect(args.device)
    check_mixed_precision(info, args.mixed_precision)
    if args.use_8bit_adam:
        _require("bitsandbytes", "--use_8bit_adam needs bitsandbytes (CUDA only); drop the flag or pip install bitsandbytes")
    if args.optimizer.lower() == "prodigy":
        _require("prodigyopt", "--optimizer prodigy needs prodigyopt; pip install prodigyopt")
    if args.push_to_hub:
        check_hub_reachable()
    model_dir = resolve_model_dir(args)
    if args.enable_npu_flash_attention and info.type != "npu":
        raise UserError("--enable_npu_flash_attention needs an Ascend NPU with torch_npu; drop the flag on this host")
    resume = checkpoints.resolve_resume(args.output_dir, args.resume_from_checkpoint, run_type)

    from accelerate.utils import ProjectConfiguration, set_seed

    log_with = None if args.report_to == "none" else (["tensorboard", "wandb"] if args.report_to == "all" else args.report_to)
    if log_with in ("wandb", ["tensorboard", "wandb"]):
        _require("wandb", "--report_to wandb needs wandb; pip install wandb or use --report_to tensorboard")
    accelerator = build_accelerator(
        info, gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=log_with, project_config=ProjectConfiguration(project_dir=args.output_dir,
                                                               logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    _sync_deepspeed_accumulation(accelerator, args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    main = accelerator.is_main_process
    if args.seed is not None:
        set_seed(args.seed, device_specific=True)
    if args.allow_tf32 and info.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if main:
        checkpoints.prepare_output_dir(args.output_dir)
        stale = checkpoints.remove_partials(args.output_dir)
        if stale:
            logger.info("removed incomplete checkpoint folders from an interrupted run: %s", ", ".join(stale))
    accelerator.wait_for_everyone()

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    models = load_models(args, model_dir, weight_dtype)
    if args.with_prior_preservation:
        class_images = prepare_class_images(args, accelerator, info)
    else:
        class_images = None
    trainables = setup_trainables(args, models, weight_dtype)
    device = accelerator.device
    for module in (models.vae, models.text_encoder_2, models.text_encoder, models.transformer):
        module.to(device)
    if args.gradient_checkpointing:
        models.transformer.enable_gradient_checkpointing()
        if args.train_text_encoder:
            models.text_encoder.gradient_checkpointing_enable()

    dataset = DreamBoothDataset(args, class_images, seed=args.seed or 0)
    if dataset.skipped:
        logger.warning("skipped %d unreadable image(s) (--skip_bad_images)", dataset.skipped)
    sampler = EpochShuffleSampler(len(dataset), seed=args.seed or 0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler, collate_fn=collate,
                                         num_workers=args.dataloader_num_workers, drop_last=False,
                                         # its own generator: creating an iterator must not draw from the global
                                         # RNG, or a resumed run's noise would drift from the uninterrupted run's
                                         generator=torch.Generator().manual_seed(args.seed or 0))

    lr = args.learning_rate
    if args.scale_lr:
        lr = lr * args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = build_optimizer(args, trainables, lr)

    updates_per_epoch = math.ceil(math.ceil(len(dataset) / args.train_batch_size / accelerator.num_processes) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    epochs = math.ceil(max_steps / updates_per_epoch)

    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)

    text_encoder = models.text_encoder if args.train_text_encoder else None
    if text_encoder is not None:
        transformer, text_encoder, optimizer, loader, lr_scheduler = accelerator.prepare(
            models.transformer, text_encoder, optimizer, loader, lr_scheduler)
    else:
        transformer, optimizer, loader, lr_scheduler = accelerator.prepare(models.transformer, optimizer, loader, lr_scheduler)
    register_state_hooks(args, accelerator, models)

    if main:
        accelerator.init_trackers("flux-dreambooth-lora" if args.lora else "flux-dreambooth",
                                  config={k: v for k, v in vars(args).items() if k != "hub_token" and isinstance(v, (int, float, str, bool))})
    global_step, first_epoch, skip_batches = 0, 0, 0
    if resume:
        path, state = resume
        checkpoints.load(accelerator, path)
        global_step = state["global_step"]
        first_epoch = global_step // updates_per_epoch
        skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
        logger.info("resumed from %s at step %d", path, global_step)
    elif args.resume_from_checkpoint:
        logger.info("no checkpoint in %s yet: starting a new run", args.output_dir)

    world = accelerator.num_processes
    per_process_images = args.train_batch_size * args.gradient_accumulation_steps * (2 if class_images else 1)
    step_flops, peak = _flops_and_peak(args, models, info, weight_dtype, per_process_images)
    meter = Throughput(args.train_batch_size * world * args.gradient_accumulation_steps, args.throughput_warmup_steps,
                       step_flops, peak, info)
    cache = Cache(enabled=not args.no_cache)
    if main:
        logger.info("%s run: %d samples, %d process(es) on %s, micro batch %d, accumulation %d, %d steps (%d epochs), %s",
                    run_type, len(dataset), world, info.type, args.train_batch_size, args.gradient_accumulation_steps,
                    max_steps, epochs, accelerator.mixed_precision)

    from tqdm.auto import tqdm

    progress = tqdm(total=max_steps, initial=global_step, desc="steps", disable=not main)
    if main:  # a fresh start (also 'latest' with no checkpoint yet) keeps no lines of a dead run
        _truncate_step_log(args.output_dir, global_step)
    stop = StopRequest()
    # One JSON line per optimizer step (appended across resumes): loss curves without tensorboard.
    step_log = open(os.path.join(args.output_dir, "train_log.jsonl"), "a") if main else None
    last_loss = float("nan")
    train_start = time.perf_counter()
    step_start = None
    for epoch in range(first_epoch, epochs):
        # accelerate's loader sets the sampler's epoch from its own counter on every new iterator; set
        # that counter, so a resumed run's epochs get the same permutations as an uninterrupted run's.
        loader.set_epoch(epoch)
        transformer.train()
        if text_encoder is not None:
            text_encoder.train()
        epoch_loader = loader
        if skip_batches:
            epoch_loader = accelerator.skip_first_batches(loader, skip_batches)
            epoch_loader.set_epoch(epoch)
        skip_batches = 0
        for batch in epoch_loader:
            if step_start is None:
                step_start = time.perf_counter()
            trained = [transformer] + ([text_encoder] if text_encoder is not None else [])
            with accelerator.accumulate(*trained):
                loss = flow_matching_loss(args, models, transformer, batch, cache, device, weight_dtype, text_encoder)
                accelerator.backward(loss)
                if accelerator.sync_gradients and not is_deepspeed(accelerator):
                    accelerator.clip_grad_norm_(trainables.transformer_params + trainables.text_encoder_params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue

            synchronize(info)
            meter.record(time.perf_counter() - step_start)
            step_start = None
            global_step += 1
            last_loss = record_step(accelerator, step_log, progress, global_step, loss, lr_scheduler.get_last_lr()[0], meter.last)
            if main and global_step % args.log_every == 0 and meter.times:
                s = meter.summary()
                logger.info("step %d: loss %.4f, %.3f images/s, %.3f s/step", global_step, last_loss, s["images_per_sec"], s["sec_per_step"])

            stopping = stop.requested(accelerator)
            if global_step % args.checkpointing_steps == 0 or stopping:
                checkpoints.save(accelerator, args.output_dir, global_step,
                                 {"run_type": run_type, "global_step": global_step, "world_size": world,
                                  "train_batch_size": args.train_batch_size,
                                  "gradient_accumulation_steps": args.gradient_accumulation_steps},
                                 args.checkpoints_total_limit)
                if main:
                    logger.info("saved checkpoint-%d", global_step)
            if stopping:
                raise Interrupted(f"stopped by {stop.signal_name} at step {global_step}; checkpoint-{global_step} is saved in "
                                  f"{args.output_dir!r}; resume with the same command plus --resume_from_checkpoint latest")
            if global_step >= max_steps:
                break
        if global_step >= max_steps:
            break
        if main and args.validation_prompt and (epoch + 1) % args.validation_epochs == 0:
            run_validation(args, accelerator, models, transformer, text_encoder, weight_dtype, epoch + 1)
    progress.close()
    stop.restore()
    if step_log:
        step_log.close()
    train_seconds = time.perf_counter() - train_start

    accelerator.wait_for_everyone()
    sample_images = []
    if main:
        save_final(args, accelerator, models, transformer, text_encoder, weight_dtype)
        if args.validation_prompt:
            sample_images = run_validation(args, accelerator, models, transformer, text_encoder, weight_dtype, "final")
        if args.lora:
            write_model_card(args, sample_images)
        if args.push_to_hub:
            push_to_hub(args)
    accelerator.wait_for_everyone()
    accelerator.end_training()

    summary = meter.summary()
    summary.update({
        "final_loss": last_loss, "train_seconds": train_seconds, "e2e_seconds": time.perf_counter() - e2e_start,
        "world_size": world, "grad_accum": args.gradient_accumulation_steps, "micro_batch": args.train_batch_size,
        "global_step": global_step, "max_train_steps": max_steps, "device": info.type,
        "mixed_precision": accelerator.mixed_precision, "run_type": run_type, "output_dir": os.path.abspath(args.output_dir),
    })
    if main:
        with open(os.path.join(args.output_dir, "train_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        # the printed line stays one short line however long the run: per-step times are in the file
        print(json.dumps({k: v for k, v in summary.items() if k != "step_seconds"}), flush=True)
    return summary


def record_step(accelerator, step_log, progress, step: int, loss, lr: float, seconds: float) -> float:
    """Report optimizer step `step` (every rank calls it): the loss averaged over processes goes to
    the trackers, the progress bar and train_log.jsonl. Returns that loss."""
    value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
    progress.update(1)
    progress.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
    accelerator.log({"loss": value, "lr": lr}, step=step)
    if step_log is not None:
        step_log.write(json.dumps({"step": step, "loss": value, "lr": lr, "sec": seconds}) + "\n")
        step_log.flush()
    return value


class Interrupted(UserError):
    """Training stopped on request after writing a checkpoint (exit status 2 with how to resume)."""


class StopRequest:
    """SIGINT/SIGTERM ask for a checkpoint at the next optimizer step, then a clean exit.

    Ranks can see a signal at different steps, and saving is collective, so they agree on it
    (a max-reduce of the flag) before anyone saves. A second signal stops at once.
    """

    def __init__(self):
        import signal

        self.signal_name = None
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame):
        import signal

        if self.signal_name is not None:  # second signal: give up on the checkpoint
            self.restore()
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name} received: finishing this step and saving a checkpoint (send again to stop now)",
              file=sys.stderr, flush=True)

    def requested(self, accelerator) -> bool:
        flag = self.signal_name is not None
        if accelerator.num_processes > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
            flag = accelerator.reduce(t, reduction="sum").item() > 0
            if flag and self.signal_name is None:
                self.signal_name = "a signal on another process"
        return flag

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _truncate_step_log(output_dir: str, step: int) -> None:
    """Drop log lines of steps after the resumed checkpoint (the crashed run's lost work)."""
    path = os.path.join(output_dir, "train_log.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            kept = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= step]
        with open(path, "w") as f:
            f.writelines(kept)


def _require(module: str, message: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(message)


def _sync_deepspeed_accumulation(accelerator, args) -> None:
    """Make DeepSpeed's accumulation the trainer's flag: accelerate would silently prefer the config's."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    configured = plugin.deepspeed_config.get("gradient_accumulation_steps")
    if configured not in (None, "auto", args.gradient_accumulation_steps) and accelerator.is_main_process:
        logger.warning("DeepSpeed config says gradient_accumulation_steps=%s; using --gradient_accumulation_steps=%d",
                       configured, args.gradient_accumulation_steps)
    plugin.deepspeed_config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    plugin.deepspeed_config["gradient_clipping"] = args.max_grad_norm


def build_optimizer(args, t: Trainables, lr: float):
    groups = [{"params": t.transformer_params, "lr": lr}]
    if t.text_encoder_params:
        groups.append({"params": t.text_encoder_params, "lr": args.text_encoder_lr if args.lora else lr,
                       "weight_decay": args.adam_weight_decay_text_encoder})
    if args.optimizer.lower() == "prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(groups, lr=lr, betas=(args.adam_beta1, args.adam_beta2), beta3=args.prodigy_beta3,
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, decouple=args.prodigy_decouple,
                                  use_bias_correction=args.prodigy_use_bias_correction,
                                  safeguard_warmup=args.prodigy_safeguard_warmup)
    cls = torch.optim.AdamW
    if args.use_8bit_adam:
        import bitsandbytes

        cls = bitsandbytes.optim.AdamW8bit
    return cls(groups, lr=lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def register_state_hooks(args, accelerator, m: Models) -> None:
    """Checkpoint hooks: LoRA files for LoRA runs, diffusers-format model folders for full runs."""
    if args.lora:
        te = m.text_encoder if args.train_text_encoder else None
        save_dtype = torch.float32 if args.upcast_before_saving else None
        save_hook, load_hook = lora_save_load_hooks(accelerator, m.transformer, te, save_dtype)
    else:
        ours = {"transformer": m.transformer}
        if args.train_text_encoder:
            ours["text_encoder"] = m.text_encoder

        def which(model):
            bare = unwrap_model(model)
            return next((name for name, mod in ours.items() if mod is bare), None)

        def save_hook(models, weights, output_dir):
            for i in reversed(range(min(len(models), len(weights)))):
                if which(models[i]):
                    weights.pop(i)  # saved below in diffusers' layout instead of accelerate's
            if accelerator.is_main_process:
                for name, module in ours.items():
                    module.save_pretrained(os.path.join(output_dir, name), safe_serialization=True)

        def load_hook(models, input_dir):
            from safetensors.torch import load_file

            for i in reversed(range(len(models))):
                name = which(models[i])
                if name is None:
                    continue
                models.pop(i)
                folder = os.path.join(input_dir, name)
                shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
                if not shards:  # never fall back to pickle formats: loading those can run code
                    raise UserError(f"checkpoint {input_dir!r} holds no {name} weights as .safetensors in {folder!r} "
                                    "(.bin/.pt pickles are refused); resume from a checkpoint this trainer wrote")
                state = {}
                for f in shards:
                    state.update(load_file(os.path.join(folder, f)))
                ours[name].load_state_dict(state)
    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ------------------------------------------------------------------------------ class images

def prepare_class_images(args, accelerator, info) -> list[str]:
    """Fill --class_data_dir up to --num_class_images with images from the base model."""
    os.makedirs(args.class_data_dir, exist_ok=True)
    have = len([f for f in os.listdir(args.class_data_dir) if f.lower().endswith(IMAGE_EXTENSIONS)])
    if have < args.num_class_images:
        from diffusers import FluxPipeline

        dtype = torch_dtype(args.prior_generation_precision or ("bf16" if info.type != "cpu" else "fp32"))
        pipe = FluxPipeline.from_pretrained(resolve_model_dir(args), torch_dtype=dtype, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(accelerator.device)
        todo = list(range(have, args.num_class_images))
        mine = todo[accelerator.process_index::accelerator.num_processes]
        from tqdm.auto import tqdm

        for start in tqdm(range(0, len(mine), args.sample_batch_size), desc="class images", disable=not accelerator.is_local_main_process):
            chunk = mine[start:start + args.sample_batch_size]
            gens = [torch.Generator().manual_seed((args.seed or 0) * 1000003 + i) for i in chunk]
            images = pipe([args.class_prompt] * len(chunk), height=args.resolution, width=args.resolution,
                          num_inference_steps=args.num_validation_steps, generator=gens).images
            for i, image in zip(chunk, images):
                image.save(os.path.join(args.class_data_dir, f"class_{i:05d}.png"))
        del pipe
        accelerator.wait_for_everyone()
    return list_images(args.class_data_dir, "--class_data_dir")[: args.num_class_images]


# ------------------------------------------------------------------------------ validation & saving

def run_validation(args, accelerator, m: Models, transformer, text_encoder, weight_dtype, tag) -> list[str]:
    """Render num_validation_images for validation_prompt; save a PNG grid and log to the trackers."""
    from diffusers import FluxPipeline
    from PIL import Image

    pipe = FluxPipeline(scheduler=m.scheduler, vae=m.vae, text_encoder=unwrap_model(text_encoder) if text_encoder is not None else m.text_encoder,
                        tokenizer=m.tokenizer, text_encoder_2=m.text_encoder_2, tokenizer_2=m.tokenizer_2,
                        transformer=unwrap_model(transformer))
    pipe.set_progress_bar_config(disable=True)
    was_training = pipe.transformer.training
    pipe.transformer.eval()
    images = []
    with torch.no_grad(), accelerator.autocast():
        for i in range(args.num_validation_images):
            g = torch.Generator(device="cpu").manual_seed((args.seed or 0) + i)
            images.append(pipe(args.validation_prompt, height=args.resolution, width=args.resolution,
                               num_inference_steps=args.num_validation_steps, guidance_scale=args.guidance_scale,
                               generator=g, max_sequence_length=args.max_sequence_length).images[0])
    if was_training:
        pipe.transformer.train()
    out_dir = os.path.join(args.output_dir, "validation")
    os.makedirs(out_dir, exist_ok=True)
    cols = min(4, len(images))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    name = f"validation-{tag if isinstance(tag, str) else f'epoch-{tag}'}.png"
    path = os.path.join(out_dir, name)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), 0 if isinstance(tag, str) else tag, dataformats="NHWC")
    return [path]


def save_final(args, accelerator, m: Models, transformer, text_encoder, weight_dtype) -> None:
    try:
        _write_final(args, m, transformer, text_encoder, weight_dtype)
    except Exception as err:
        reason = checkpoints.write_failure(err, args.output_dir)
        if reason is None:
            raise
        found = checkpoints.complete_checkpoints(args.output_dir)
        keep = f"{found[-1][1]!r} is intact" if found else "no checkpoint was written"
        raise UserError(f"could not write the final weights to {args.output_dir!r}: {reason}; {keep}; free disk space "
                        "or fix permissions, then rerun with --resume_from_checkpoint latest") from None


def _write_final(args, m: Models, transformer, text_encoder, weight_dtype) -> None:
    if args.lora:
        dtype = torch.float32 if args.upcast_before_saving else weight_dtype
        save_lora(args.output_dir, transformer, text_encoder, dtype)
        return
    # Full fine-tune: a complete pipeline folder; untouched components are copied from the base model.
    # Each component is staged and renamed into place, so a failure never leaves half a component.
    trained = {"transformer": unwrap_model(transformer)}
    if text_encoder is not None:
        trained["text_encoder"] = unwrap_model(text_encoder)
    for name in PIPELINE_COMPONENTS:
        staging = os.path.join(args.output_dir, f".partial-{name}")
        final = os.path.join(args.output_dir, name)
        shutil.rmtree(staging, ignore_errors=True)
        try:
            if name in trained:
                trained[name].save_pretrained(staging, safe_serialization=True)
            else:
                shutil.copytree(os.path.join(m.model_dir, name), staging)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    shutil.copy2(os.path.join(m.model_dir, "model_index.json"), os.path.join(args.output_dir, "model_index.json"))


def check_hub_reachable() -> None:
    """Fail before training, not after hours of it, when --push_to_hub cannot work."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    fix = "train without --push_to_hub and upload the output folder later with `hf upload`"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"--push_to_hub needs the hub, but HF_HUB_OFFLINE is set; {fix}")
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=10).close()
    except OSError as err:
        raise UserError(f"--push_to_hub cannot reach {constants.ENDPOINT} ({err}); {fix}") from None


def push_to_hub(args) -> None:
    """Upload the final weights (not checkpoints or logs) to --hub_model_id (default: the folder's name)."""
    from huggingface_hub import HfApi

    repo = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    try:
        api = HfApi(token=args.hub_token)
        repo_id = api.create_repo(repo, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="fluxkit DreamBooth training",
                          ignore_patterns=["checkpoint-*", ".partial-*", "logs/*", "train_log.jsonl"])
    except Exception as err:  # network and auth errors come in many types; the weights are safe on disk
        raise UserError(f"--push_to_hub: upload to {repo!r} failed ({type(err).__name__}: {str(err)[:200]}); the trained "
                        f"weights are complete in {args.output_dir!r}; upload them with `hf upload {repo} {args.output_dir}`") from None


def write_model_card(args, sample_images: list[str]) -> None:
    flags = {k: v for k, v in vars(args).items() if k not in ("hub_token", "local_rank") and v not in (None, False)}
    lines = [
        "---", f"base_model: {args.pretrained_model_name_or_path}", "library_name: diffusers", "tags:",
        "- flux", "- text-to-image", "- lora", "- dreambooth", f"instance_prompt: {args.instance_prompt}", "---", "",
        f"# FLUX DreamBooth LoRA", "",
        f"LoRA weights (rank {args.rank}, alpha {args.lora_alpha}) for `{args.pretrained_model_name_or_path}`, "
        f"trained with fluxkit's train_flux_dreambooth_lora.py.", "",
        f"Trigger prompt: `{args.instance_prompt}`", "",
        "```python", "import torch", "from diffusers import FluxPipeline",
        f"pipe = FluxPipeline.from_pretrained({args.pretrained_model_name_or_path!r}, torch_dtype=torch.bfloat16)",
        "pipe.load_lora_weights('.', weight_name='pytorch_lora_weights.safetensors')",
        f"image = pipe({args.instance_prompt!r}).images[0]", "```", "", "## Training flags", "",
    ]
    lines += [f"- `{k}`: `{v}`" for k, v in sorted(flags.items())]
    if sample_images:
        lines += ["", "## Samples", ""] + [f"![sample]({os.path.relpath(p, args.output_dir)})" for p in sample_images]
    with open(os.path.join(args.output_dir, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
