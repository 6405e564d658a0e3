"""One training run, behind train_flux_dreambooth.py (full) and train_flux_dreambooth_lora.py.

Read it top to bottom; `train` is the whole story:

    setup   checks that can fail early, the accelerator, models and trainables, data, optimizer
    resume  the checkpoint to continue from, if any: states, step, and where the data stood
    loop    epochs of micro batches; after each optimizer step: log, maybe checkpoint, maybe stop
    finish  final weights, validation, model card, hub upload, and the run's summary

Everything these share is one `Run`. Full and LoRA runs differ only in what trains and how
weights are saved. The parts live in modules named for what they hold: models and trainables
(models.py), the flow-matching loss (loss.py), encoding through the latent/text cache (encode.py, cache/), checkpoints and
their save/load hooks (checkpoint/), outputs (outputs.py), signals and throughput
(runcontrol.py), data (data.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass

import torch

from .. import cache as latent_cache
from . import blockswap, offload, outputs, pivotal, startup
from .. import checkpoint, plan
from ..shared import fsio, host_runtime, quiet
from ..shared.errors import UserError
from ..weights import quant, zero3
from .. import families
from ..data.buckets import BucketSampler
from ..cache import Cache
from ..data.dataset import DreamBoothDataset, EpochShuffleSampler, collate, stop_workers
from ..shared.device import (allow_fast_fp32_matmul, build_accelerator, detect, empty_cache, end_training, is_deepspeed,
                             synchronize, torch_dtype, using_deepspeed, zero_stage)
from .encode import encode_batch
from .loss import flow_matching_loss
from .preflight import check_host, require
from .models import (Models, Trainables, build_optimizer, freeze_encoders, load_models, load_transformer, resolve_model_dir,
                     setup_trainables)
from .runcontrol import Interrupted, StopRequest, Throughput, flops_and_peak
from ..data.scan import scan_dataset

logger = logging.getLogger("fluxkit.training.train")
STEP_LOG = "train_log.jsonl"  # one JSON line per optimizer step, appended across resumes


@dataclass(frozen=True)
class Schedule:
    """How long the run is: optimizer steps per epoch, optimizer steps in all, and epochs."""
    updates_per_epoch: int
    max_steps: int
    epochs: int


@dataclass
class Run:
    """One training run: what setup built, and where the loop stands."""
    args: object
    info: object  # fluxkit.shared.device.DeviceInfo
    accelerator: object
    models: Models
    trainables: Trainables
    weight_dtype: torch.dtype
    dataset: DreamBoothDataset
    loader: object
    optimizer: object
    lr_scheduler: object
    transformer: torch.nn.Module  # as prepared by accelerate (possibly wrapped)
    text_encoder: torch.nn.Module | None  # CLIP as prepared, when it trains
    schedule: Schedule
    resume_from: tuple[str, dict] | None  # (checkpoint path, its state) or None
    cache: Cache
    meter: Throughput
    started: float  # time.perf_counter() at the start of setup
    pivot: pivotal.Pivot | None = None  # --train_text_encoder_ti: the new tokens (fluxkit.training.pivotal)
    gate: pivotal.FractionGate | None = None  # the --train_*_frac fractions
    step: int = 0  # optimizer steps done
    first_epoch: int = 0
    skip_batches: int = 0  # micro batches of first_epoch already trained before a resume
    last_loss: float = float("nan")
    step_started: float | None = None
    train_seconds: float = 0.0
    stop: StopRequest | None = None
    progress: object = None
    step_log: object = None  # open STEP_LOG on the main process

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def validates(self) -> bool:
        """Whether this process renders validation images: the main one, or all of them under ZeRO-3."""
        return bool(self.args.validation_prompt) and (self.main or zero3.is_zero3(self.accelerator))

    @property
    def run_type(self) -> str:
        return "lora" if self.args.lora else "full"


def train(args) -> dict:
    """The whole run; returns the summary it also prints and writes to train_summary.json."""
    startup.begin("imports")  # interpreter start-up and imports, from this process's start
    host_runtime.leave_out(quant.libraries_not_needed(args.base_quantization, args.use_8bit_adam,
                                                      args.pretrained_model_name_or_path, args.text_encoder_quantization))
    quiet.install()
    fresh = not os.path.exists(args.output_dir)
    try:
        run = setup(args)
    except UserError:
        if fresh:  # a refusal after the output folder was made (e.g. --lora_layers, judged on the loaded model)
            with contextlib.suppress(OSError):  # leaves nothing behind; a folder that holds anything stays
                os.rmdir(args.output_dir)
        raise
    try:
        resume(run)
        loop(run)
    finally:
        stop_workers(run.loader)
    startup.mark("train")  # the steps after the first
    return finish(run)


# ------------------------------------------------------------------------------------------ setup

def setup(args) -> Run:
    started = time.perf_counter()
    info, model_dir, resume_from, memory = preflight(args)
    startup.mark("plan")
    args, tokens = pivotal.prepare_prompts(args, model_dir)  # TOK -> <s0><s1> in the prompts, before the scan reads them
    scan = scan_dataset(args, world_size=int(os.environ.get("WORLD_SIZE", "1")))  # before anything loads or is written
    pivotal.rewrite_captions(tokens, scan)
    latent_cache.check_cache_dir(args, given_only=True)
    startup.mark("scan")
    accelerator = start_accelerator(args, info)
    startup.mark("accelerate")
    latent_cache.check_cache_dir(args)  # the default one, beside the output folder just proven writable
    if accelerator.is_main_process:  # before anything loads: what this run should take per device
        (logger.warning if memory[0] is not None and memory[0].fits is False else logger.info)(memory[1])
    weight_dtype = torch_dtype(accelerator.mixed_precision)  # frozen weights and activations: the compute dtype
    models, trainables, dataset, cache, class_images, pivot = prepare_models(args, accelerator, info, model_dir,
                                                                            weight_dtype, scan, tokens,
                                                                            plan.text_on_host(memory[0]))
    startup.mark("model load")
    loader = build_data(args, dataset, accelerator.num_processes)
    world = accelerator.num_processes
    # the sampler's length: buckets pad each bucket to whole global batches
    updates_per_epoch = math.ceil(math.ceil(len(loader.sampler) / args.train_batch_size / world) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    schedule = Schedule(updates_per_epoch, max_steps, math.ceil(max_steps / updates_per_epoch))
    optimizer, lr_scheduler = build_optimization(args, world, trainables, schedule, zero3.host_optimizer(accelerator))
    gate = pivotal.fraction_gate(args, trainables, schedule.epochs)
    if pivot is not None:
        pivot.gate = gate

    text_encoder = models.text_encoder if args.train_text_encoder else None
    if text_encoder is not None:
        transformer, text_encoder, optimizer, loader, lr_scheduler = accelerator.prepare(
            models.transformer, text_encoder, optimizer, loader, lr_scheduler)
    else:
        transformer, optimizer, loader, lr_scheduler = accelerator.prepare(models.transformer, optimizer, loader, lr_scheduler)
    checkpoint.register_state_hooks(args, accelerator, models)
    pivotal.register_state_hooks(accelerator, pivot)
    startup.mark("prepare")
    if accelerator.is_main_process:
        accelerator.init_trackers("flux-dreambooth-lora" if args.lora else "flux-dreambooth",
                                  config={k: v for k, v in vars(args).items() if k != "hub_token" and isinstance(v, (int, float, str, bool))})

    per_process_images = args.train_batch_size * args.gradient_accumulation_steps * (2 if class_images else 1)
    step_flops, peak = flops_and_peak(args, models, info, weight_dtype, per_process_images)
    meter = Throughput(args.train_batch_size * world * args.gradient_accumulation_steps, args.throughput_warmup_steps,
                       step_flops, peak, info)
    run = Run(args, info, accelerator, models, trainables, weight_dtype, dataset, loader, optimizer, lr_scheduler,
              transformer, text_encoder, schedule, resume_from, cache, meter, started, pivot, gate)
    if run.main:
        logger.info("%s run: %d samples, %d process(es) on %s, micro batch %d, accumulation %d, %d steps (%d epochs), %s",
                    run.run_type, len(dataset), world, info.type, args.train_batch_size, args.gradient_accumulation_steps,
                    max_steps, schedule.epochs, accelerator.mixed_precision)
    return run


def preflight(args):
    """Everything that can be refused before anything heavy starts: (device info, model folder,
    (checkpoint, state) to resume or None, (memory plan or None, its line))."""
    info = detect(args.device)
    check_host(args, info, deepspeed=using_deepspeed())  # the launcher checked the same before starting us
    if args.push_to_hub:
        outputs.check_hub_reachable()
    model_dir = resolve_model_dir(args)
    families.of_args(args, model_dir).check(args, model_dir)  # the family's own refusals (e.g. no CLIP to train)
    blockswap.check_launch(args, using_deepspeed(), model_dir)
    # the processes accelerate started (WORLD_SIZE), before the Accelerator exists
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    resume_from = checkpoint.check_run_folder(args, world)
    # the memory plan: a run that cannot fit the device is refused here, before any weights load,
    # unless --ignore_memory_plan (the launchers check the same before they start the processes)
    memory = plan.check_fits(args, world, zero_stage() or 0, info,
                             int(os.environ.get("LOCAL_WORLD_SIZE", world) or world), model_dir)
    return info, model_dir, resume_from, memory


def start_accelerator(args, info):
    """The Accelerator (trackers, DeepSpeed, mixed precision), logging, seeds, and a writable output_dir."""
    from accelerate.utils import ProjectConfiguration, set_seed

    log_with = None if args.report_to == "none" else (["tensorboard", "wandb"] if args.report_to == "all" else args.report_to)
    if log_with in ("wandb", ["tensorboard", "wandb"]):
        require("wandb", "--report_to wandb needs wandb; pip install wandb or use --report_to tensorboard")
    accelerator = build_accelerator(
        info, gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=log_with, project_config=ProjectConfiguration(project_dir=args.output_dir,
                                                               logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    _sync_deepspeed_accumulation(accelerator, args)
    zero3.check_supported(args, accelerator)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    if args.seed is not None:
        set_seed(args.seed, device_specific=True)
    if args.allow_tf32:
        allow_fast_fp32_matmul(info.type)
    if accelerator.is_main_process:
        if args.overwrite_output_dir:
            moved = checkpoint.move_aside_previous_run(args.output_dir)
            if moved:
                logger.info("--overwrite_output_dir: the previous run in %s moved to %s", args.output_dir, moved)
        fsio.ensure_writable_dir(args.output_dir)
        stale = checkpoint.remove_partials(args.output_dir)
        if stale:
            logger.info("removed incomplete checkpoint folders from an interrupted run: %s", ", ".join(stale))
    accelerator.wait_for_everyone()
    return accelerator


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


def prepare_models(args, accelerator, info, model_dir: str, weight_dtype, scan, tokens=None, text_on_host=False):
    """(models on the device, what trains, the dataset, its filled cache, class images or None, the
    pivotal tuning or None).

    Two phases that never share the device: first the encoders (text encoders, VAE) load and
    encode every latent and prompt embedding the run needs (each process its share) into the
    persistent cache, then leave (the VAE keeps its decoder for validation; CLIP stays when it
    trains); only then is the transformer read, quantized and moved to the device. When the cache
    already covers the run, the text encoders are not loaded at all. The memory plan
    (fluxkit.plan) models the same phases.
    """
    with zero3.whole_models(accelerator):  # frozen encoders stay whole; prepare() shards the transformer
        class_images = outputs.prepare_class_images(args, accelerator, info) if args.with_prior_preservation else None
    dataset, cache, prompts = latent_cache.prepare_data(args, scan, class_images, model_dir, weight_dtype,
                                                        accelerator.device)
    if dataset.skipped:
        logger.warning("skipped %d unreadable image(s) (--skip_bad_images)", dataset.skipped)
    covered = cache.enabled and not cache.missing_latents() and not cache.missing_prompts(prompts)
    keep_clip = args.train_text_encoder or tokens is not None  # encoders that run every step
    keep_t5 = tokens is not None and args.enable_t5_ti
    without = ("transformer",) + (("text_encoder_2",) if covered and not keep_t5 else ())
    if covered and not keep_clip:
        without += ("text_encoder",)
    # a quantized text encoder lands where it encodes as it loads (fluxkit.weights.quant.load_text_encoder)
    text_device = "cpu" if text_on_host or args.offload_encoders else accelerator.device
    with zero3.whole_models(accelerator):
        models = load_models(args, model_dir, without, weight_dtype, info.type, text_device=text_device)
    startup.mark("model load")
    encode_phase(args, accelerator, models, dataset, cache, prompts, covered, weight_dtype, (keep_clip, keep_t5),
                 text_on_host and not (keep_clip or keep_t5))
    startup.mark("cache")
    deepspeed = zero_stage(accelerator) is not None
    with zero3.whole_models(accelerator):
        models.transformer = load_transformer(args, model_dir, weight_dtype, info.type, deepspeed)
    trainables = setup_trainables(args, models, weight_dtype)
    pivot = pivotal.attach(args, tokens, models, trainables)  # after the fill: cached entries never see the new tokens
    if not zero3.is_zero3(accelerator):  # DeepSpeed moves it itself under ZeRO-3 (cast to bf16, to shard it)
        blockswap.place(args, models.transformer, accelerator.device)  # --blocks_to_swap: part stays in host memory
    if args.gradient_checkpointing:
        models.transformer.enable_gradient_checkpointing()
        if args.train_text_encoder:
            models.text_encoder.gradient_checkpointing_enable()
    return models, trainables, dataset, cache, class_images, pivot


def encode_phase(args, accelerator, models, dataset, cache, prompts, covered: bool, weight_dtype, keep=(False, False),
                 text_on_host: bool = False) -> None:
    """The encoders on the device (host memory with --offload_encoders), the cache filled, and the
    encoders released once it holds everything, but for those that run every step (keep: CLIP, T5);
    without a cache they stay for the whole run. text_on_host (the plan's decision: T5 does not fit
    on the device beside the VAE): the text encoders encode on the host CPU."""
    freeze_encoders(args, models, weight_dtype)
    host = offload.text_encoders(models) if text_on_host and cache.enabled else []
    for module in offload.resident(args, models):  # --offload_encoders leaves the frozen encoders in host memory
        if not any(module is h for h in host):
            module.to(accelerator.device)
    if not cache.enabled:
        return
    if not covered:
        if accelerator.is_main_process and host:  # the usual case (on the device) is not worth a console line
            logger.info("prompts are encoded on the host CPU (the plan: the text encoders do not fit on the device "
                        "beside the VAE)")
        with offload.encoders_visiting(args, models, accelerator.device, text=not host):
            stats = fill_cache(args, accelerator, models, dataset, cache, prompts, torch.device("cpu") if host else None)
        if accelerator.is_main_process:
            logger.info("cache %s: encoded %d latent(s) and %d prompt(s) in %.1f s", cache.root, stats["latents"],
                        stats["text"], stats["seconds"])
    elif accelerator.is_main_process:
        logger.info("cache %s covers this run: nothing to encode, text encoders not loaded", cache.root)
    release_encoders(models, keep_clip=keep[0], device_type=accelerator.device.type, keep_t5=keep[1])
    dataset.use_cached_latents(*cache.unreadable_images())  # workers read captions only


def fill_cache(args, accelerator, models, dataset, cache, prompts, text_device=None) -> dict:
    """Encode what the cache lacks, every process its share (fluxkit.cache.fill); prompts on
    text_device (default: the run's device)."""
    from .encode import encode_prompts, latent_moments

    device = text_device or accelerator.device
    return latent_cache.fill(
        cache, dataset, prompts,
        encode_image=lambda pixels: latent_moments(models.vae, pixels),
        encode_text=lambda batch: encode_prompts(batch, models, args, device),
        rank=accelerator.process_index, world=accelerator.num_processes, barrier=accelerator.wait_for_everyone,
        num_workers=args.dataloader_num_workers, show=accelerator.is_local_main_process)


def release_encoders(models: Models, keep_clip: bool, device_type: str, keep_t5: bool = False) -> None:
    """Drop what only encoding needed once everything is cached: the VAE encoder (the decoder stays
    for validation), T5 and CLIP unless they run every step (CLIP trains, or new tokens train)."""
    import gc

    models.vae.encoder = None
    if not keep_t5:
        models.text_encoder_2 = None
    if not keep_clip:
        models.text_encoder = None
    gc.collect()
    empty_cache(device_type)


def build_data(args, dataset, world: int):
    """The loader: an order that is a pure function of (seed, epoch), so a resumed run replays it.
    With buckets, every global batch (micro batch x processes) is one bucket's (fluxkit.data.buckets)."""
    seed = args.seed or 0
    if dataset.scan.buckets:
        sampler = BucketSampler(dataset.scan.sample_bucket, len(dataset), args.train_batch_size, world, seed)
    else:
        sampler = EpochShuffleSampler(len(dataset), seed=seed)
    workers = args.dataloader_num_workers
    return torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler, collate_fn=collate,
                                       num_workers=workers, drop_last=False, persistent_workers=workers > 0,
                                       # its own generator: creating an iterator must not draw from the global
                                       # RNG, or a resumed run's noise would drift from the uninterrupted run's
                                       generator=torch.Generator().manual_seed(seed))


def build_optimization(args, world: int, trainables: Trainables, schedule: Schedule, on_host: bool = False):
    """(optimizer, learning-rate schedule); --scale_lr scales by processes x accumulation x batch; on_host:
    ZeRO offload runs the step on the host (fluxkit.weights.zero3.host_optimizer): AdamW's fused kernel."""
    from diffusers.optimization import get_scheduler

    lr = args.learning_rate
    if args.scale_lr:
        lr = lr * args.gradient_accumulation_steps * args.train_batch_size * world
    optimizer = build_optimizer(args, trainables, lr, fused=on_host)
    if on_host:
        logger.info("ZeRO offload: the optimizer step runs on the host as torch's fused %s (no DeepSpeed CPU Adam build)",
                    type(optimizer).__name__)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * world,
                                 num_training_steps=schedule.max_steps * world,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    return optimizer, lr_scheduler


# ------------------------------------------------------------------------------------------ resume

def resume(run: Run) -> None:
    """Load the chosen checkpoint (weights, optimizer, schedule, RNG states) and find the data's
    place: the epoch, and the micro batches of it already trained (steps x accumulation)."""
    if run.resume_from:
        path, state = run.resume_from
        checkpoint.load(run.accelerator, path, state)
        run.step = state["global_step"]
        run.first_epoch = run.step // run.schedule.updates_per_epoch
        run.skip_batches = (run.step % run.schedule.updates_per_epoch) * run.args.gradient_accumulation_steps
        logger.info("resumed from %s at step %d", path, run.step)
    elif run.args.resume_from_checkpoint:
        logger.info("no checkpoint in %s yet: starting a new run", run.args.output_dir)
    if run.main:  # a fresh start (also 'latest' with no checkpoint yet) keeps no lines of a dead run
        _truncate_step_log(run.args.output_dir, run.step)


def _truncate_step_log(output_dir: str, step: int) -> None:
    """Drop log lines of steps after the resumed checkpoint (the crashed run's lost work)."""
    path = os.path.join(output_dir, STEP_LOG)
    if os.path.isfile(path):
        with open(path) as f:
            kept = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= step]
        fsio.atomic_write_text(path, "".join(kept))


# ------------------------------------------------------------------------------------------ loop

def loop(run: Run) -> None:
    """Epochs of micro batches until max_steps; validation after every --validation_epochs epochs."""
    from tqdm.auto import tqdm

    args = run.args
    run.progress = tqdm(total=run.schedule.max_steps, initial=run.step, desc="steps", disable=not run.main)
    run.stop = StopRequest()
    run.step_log = open(os.path.join(args.output_dir, STEP_LOG), "a") if run.main else None
    if run.main and not os.environ.get(quiet.LAUNCHER_ENV):  # a launcher writes it before it starts, with its keys
        from ..launch.record import write_trainer_run_config

        write_trainer_run_config(args, run.accelerator)
    started, first_marked = time.perf_counter(), False
    try:
        for epoch in range(run.first_epoch, run.schedule.epochs):
            if run.gate is not None:
                run.gate.begin_epoch(epoch)
            for batch in epoch_batches(run, epoch):
                loss = micro_step(run, batch)
                if loss is None:  # accumulating: no optimizer step yet
                    continue
                end_optimizer_step(run, loss)
                if not first_marked:
                    startup.mark("first step")
                    first_marked = True
                if run.step >= run.schedule.max_steps:
                    break
            if run.step >= run.schedule.max_steps:
                break
            if run.validates and (epoch + 1) % args.validation_epochs == 0:
                outputs.run_validation(args, run.accelerator, run.models, run.transformer, run.text_encoder,
                                       run.weight_dtype, epoch + 1, validation_embeddings(run))
    finally:
        run.progress.close()
        run.stop.restore()
        if run.step_log:
            run.step_log.close()
    run.train_seconds = time.perf_counter() - started


def validation_embeddings(run: Run):
    """The validation prompt's embeddings from the cache when a text encoder is gone (None: the
    pipeline encodes it); CLIP's pooled embedding comes from the live CLIP when it trains."""
    m = run.models
    if m.text_encoders_loaded():
        return None
    from .encode import encode_prompts

    encode = lambda p: encode_prompts(p, m, run.args, run.accelerator.device)  # noqa: E731
    prompts = m.family.validation_prompts(run.args)
    if run.pivot is not None:  # CLIP's half of a prompt with new tokens is never cached
        with torch.no_grad():
            return run.pivot.text_embeddings(prompts, run.cache, encode, m, run.accelerator.device)
    seq, pooled = run.cache.text_embeddings(prompts, encode)
    if run.text_encoder is not None:
        from ..weights.lora import unwrap_model

        with torch.no_grad():
            pooled = m.family.trained_pooled(m, unwrap_model(run.text_encoder), prompts, run.accelerator.device)
    return seq, pooled


def epoch_batches(run: Run, epoch: int):
    """This epoch's micro batches, less those a resumed run already trained."""
    # accelerate's loader sets the sampler's epoch from its own counter on every new iterator; set
    # that counter, so a resumed run's epochs get the same permutations as an uninterrupted run's.
    run.loader.set_epoch(epoch)
    run.transformer.train()
    if run.text_encoder is not None:
        run.text_encoder.train()
    batches = run.loader
    if run.skip_batches:
        batches = run.accelerator.skip_first_batches(run.loader, run.skip_batches)
        batches.set_epoch(epoch)
    run.skip_batches = 0
    return run.dataset.checked_batches(batches)  # a worker's decode failure: one error line here


def micro_step(run: Run, batch):
    """Forward and backward of one micro batch; returns its loss when it completed an optimizer
    step (gradients synchronised, clipped, applied), else None."""
    accelerator, args = run.accelerator, run.args
    if run.step_started is None:
        run.step_started = time.perf_counter()
    trained = [run.transformer] + ([run.text_encoder] if run.text_encoder is not None else [])
    with accelerator.accumulate(*trained):
        encoded = encode_batch(run, batch)
        loss = flow_matching_loss(run.transformer, run.models.scheduler, encoded.x0, encoded.prompt_embeds,
                                  encoded.pooled, args, is_class=encoded.is_class,
                                  predict=run.models.family.predictor(encoded.refs))
        if run.pivot is not None:  # + 0: every process's graph reaches the new rows, in its batch or not (DDP, ZeRO)
            loss = loss + run.pivot.touch()
        if run.gate is not None:  # before backward: under DeepSpeed the engine steps inside it
            run.gate.hold_stopped(run.optimizer)
        accelerator.backward(loss)
        if accelerator.sync_gradients and not is_deepspeed(accelerator):
            accelerator.clip_grad_norm_(run.trainables.all, args.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss if accelerator.sync_gradients else None


def end_optimizer_step(run: Run, loss) -> None:
    """Count the step and its time, report it, then checkpoint when due or when a stop was asked for."""
    synchronize(run.info)
    run.meter.record(time.perf_counter() - run.step_started)
    run.step_started = None
    run.step += 1
    record_step(run, loss)
    stopping = run.stop.requested(run.accelerator)
    if run.step % run.args.checkpointing_steps == 0 or stopping:
        save_checkpoint(run)
    if stopping:
        raise Interrupted(f"stopped by {run.stop.signal_name} at step {run.step}; checkpoint-{run.step} is saved in "
                          f"{run.args.output_dir!r}; resume with the same command plus --resume_from_checkpoint latest")


def record_step(run: Run, loss) -> None:
    """Report optimizer step run.step (every rank calls it: the loss is averaged over processes) to
    the trackers, the progress bar and STEP_LOG, and the throughput every --log_every steps."""
    lr = run.lr_scheduler.get_last_lr()[0]
    run.last_loss = run.accelerator.reduce(loss.detach().float(), reduction="mean").item()
    run.progress.update(1)
    run.progress.set_postfix(loss=f"{run.last_loss:.4f}", lr=f"{lr:.2e}")
    run.accelerator.log({"loss": run.last_loss, "lr": lr}, step=run.step)
    if run.step_log is not None:
        run.step_log.write(json.dumps({"step": run.step, "loss": run.last_loss, "lr": lr, "sec": run.meter.last,
                                       **blockswap.step_record(run.transformer)}) + "\n")
        run.step_log.flush()
    if run.main and run.step % run.args.log_every == 0 and run.meter.times:
        s = run.meter.summary()
        logger.info("step %d: loss %.4f, %.3f images/s, %.3f s/step", run.step, run.last_loss, s["images_per_sec"], s["sec_per_step"])


def save_checkpoint(run: Run) -> None:
    args = run.args
    state = {"global_step": run.step, **checkpoint.run_settings(args, run.accelerator.num_processes)}
    checkpoint.save(run.accelerator, args.output_dir, run.step, state, args.checkpoints_total_limit)
    if run.main:
        logger.info("saved checkpoint-%d", run.step)


# ------------------------------------------------------------------------------------------ finish

def finish(run: Run) -> dict:
    """Final weights, validation images, model card and upload (main process), then the summary."""
    accelerator, args = run.accelerator, run.args
    accelerator.wait_for_everyone()
    # every rank: under ZeRO-3 saving gathers the sharded weights; the main process writes
    outputs.save_final(args, run.models, run.transformer, run.text_encoder, run.weight_dtype, main=run.main)
    pivotal.save_final(run.pivot, args.output_dir, run.main, torch.float32 if args.upcast_before_saving else run.weight_dtype)
    samples = []
    if run.validates:
        samples = outputs.run_validation(args, accelerator, run.models, run.transformer, run.text_encoder,
                                         run.weight_dtype, "final", validation_embeddings(run))
    if run.main:
        if args.lora:
            outputs.write_model_card(args, samples, run.pivot, run.models.family)
        if args.push_to_hub:
            outputs.push_to_hub(args)
    accelerator.wait_for_everyone()
    end_training(accelerator)  # trackers finished; the process group closed now or at exit (fluxkit.shared.device)
    startup.mark("save")

    summary = run.meter.summary()
    summary.update({
        "final_loss": run.last_loss, "train_seconds": run.train_seconds, "e2e_seconds": time.perf_counter() - run.started,
        "world_size": accelerator.num_processes, "grad_accum": args.gradient_accumulation_steps,
        "micro_batch": args.train_batch_size, "global_step": run.step, "max_train_steps": run.schedule.max_steps,
        "device": run.info.type, "mixed_precision": accelerator.mixed_precision, "run_type": run.run_type,
        "output_dir": os.path.abspath(args.output_dir),
        "startup_seconds": startup.phases(), "process_started_at": startup.process_started_at(),
    })
    if run.main:
        fsio.atomic_write_json(os.path.join(args.output_dir, "train_summary.json"), summary)
        if not os.environ.get(quiet.LAUNCHER_ENV):  # a launcher reports it itself
            # the printed line stays one short line however long the run: per-step times are in the file
            print(json.dumps({k: v for k, v in summary.items() if k != "step_seconds"}), flush=True)
    return summary
