"""Text-to-image with FLUX pipelines: the run behind the four infer_flux_text2img_*.py scripts.

The scripts differ only in their defaults (fluxkit.inference.args, which also holds the flags and the
prompt lists); LoRA files are found, checked and attached by fluxkit.weights.lora. What stays here is the
run: the job list and its output names, loading the pipeline, the split of work over processes
under `accelerate launch`, and the files a run writes (PNGs with their recipe, manifest.jsonl,
infer_summary.json).

Determinism: every (prompt, seed) pair gets its own CPU generator, so an image depends only on
its prompt, its seed and the settings, never on which process or batch renders it.

Resuming: an image's file name is derived from the prompt, the seed and every setting that
changes its pixels, so an existing file is exactly the image this run would produce and is
skipped (unless --overwrite). Files are written under a temporary name and renamed into place
(fluxkit.shared.fsio), so an interrupted run never leaves a half-written image behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import sys
import time
import unicodedata
from dataclasses import dataclass

from .. import families
from ..shared import host_runtime, quiet
from ..training import pivotal
from ..weights import quant
from ..shared.environment import check_pipeline_folder, hf_offline, is_hub_id, is_rank0, pipeline_folder_problem
from ..shared.errors import UserError
from ..shared.fsio import atomic_write, atomic_write_json, atomic_write_text, ensure_writable_dir, storage_problem
from .args import Request, ScriptDefaults, apply_family_defaults, collect_prompts, parse_args
from .parallel import (check_backend_for_grid, check_sequence_split, choose_attention_backend, distributed_state,
                             enable_context_parallel, launch_shortfall, plan_grid, world_size)
from ..weights.lora import LORA_WEIGHT_NAME, attach_lora, lora_components, resolve_lora_file

MANIFEST = "manifest.jsonl"
SUMMARY = "infer_summary.json"
SLUG_CHARS = 48
HASH_CHARS = 10  # 40 bits: collisions are negligible for any realistic number of prompts x seeds


# ---------------------------------------------------------------- naming and the job list

def slugify(prompt: str, max_chars: int = SLUG_CHARS) -> str:
    """A file-name-safe slug: ASCII letters, digits and '-' only, so no separator, '..', NUL or
    dot-file can reach the file system, whatever the prompt holds."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii").lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")
    return slug[:max_chars].rstrip("-") or "prompt"


def image_name(prompt: str, seed: int, settings: dict) -> str:
    """`<slug>_seed<seed>_<hash>.png`; the hash covers the prompt and every pixel-changing setting."""
    recipe = json.dumps({"prompt": prompt, "seed": seed, **settings}, sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(recipe.encode("utf-8")).hexdigest()[:HASH_CHARS]
    return f"{slugify(prompt)}_seed{seed}_{digest}.png"


@dataclass(frozen=True)
class Job:
    prompt: str
    seed: int
    file: str
    record: dict  # what goes into the PNG's text chunks and the manifest line
    image: str | None = None  # the reference image it edits (editing families)


def plan_jobs(requests: list, seeds: list[int], settings: dict) -> list[Job]:
    """Every (request, seed) pair, request-major, in a fixed order every process agrees on. A
    request's reference image enters the record by path and content hash, its name by the hash."""
    from ..cache.keys import content_digest

    digests = {r.image: content_digest(r.image) for r in requests if r.image}
    jobs = []
    for request in requests:
        image = {}
        if request.image:
            image = {"image": os.path.realpath(request.image), "image_digest": digests[request.image]}
        named = {**settings, **({"image_digest": image["image_digest"]} if image else {})}
        for seed in seeds:
            name = image_name(request.prompt, seed, named)
            jobs.append(Job(request.prompt, seed, name, {"file": name, "prompt": request.prompt, "seed": seed,
                                                         **settings, **image}, request.image))
    return jobs


def shard(items: list, index: int, count: int) -> list:
    """Process `index` of `count`'s contiguous share; shares differ in length by at most one."""
    base, extra = divmod(len(items), count)
    start = index * base + min(index, extra)
    return items[start:start + base + (1 if index < extra else 0)]


# ---------------------------------------------------------------- files

def check_output_dir(path: str) -> str:
    """Refuse an --output_dir that cannot take files, without creating it (make_output_dir does
    that once rendering starts, so a run that fails before leaves no empty folder behind)."""
    if os.path.isdir(path):
        return ensure_writable_dir(path)
    if os.path.exists(path):
        raise UserError(f"--output_dir {path!r} is a file, not a folder; choose another path")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    problem = f"{parent!r} is a file" if not os.path.isdir(parent) else storage_problem(parent)
    if problem:
        raise UserError(f"--output_dir {path!r} cannot be created ({problem}); choose another folder")
    return path


def make_output_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UserError(f"--output_dir {path!r} cannot be created ({err.strerror or err}); choose another folder") from None


def save_png(image, path: str, record: dict) -> None:
    from PIL.PngImagePlugin import PngInfo

    from .. import __version__

    info = PngInfo()
    for key, value in record.items():
        if key != "file":
            info.add_itxt(key, "" if value is None else str(value))  # iTXt: UTF-8, any prompt survives
    info.add_itxt("software", f"fluxkit {__version__}")
    atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def read_manifest(path: str) -> list[dict]:
    """Previous entries, tolerating a missing file or damaged lines (they are rewritten anyway)."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("file"), str):
                records.append(record)
    return records


def write_manifest(output_dir: str, jobs: list[Job]) -> str:
    """Earlier runs' entries whose images still exist, then this run's images in job order."""
    path = os.path.join(output_dir, MANIFEST)
    current = {job.file for job in jobs}
    kept = [r for r in read_manifest(path)
            if r["file"] not in current and os.path.isfile(os.path.join(output_dir, os.path.basename(r["file"])))]
    lines = [json.dumps(r, ensure_ascii=False) for r in kept + [job.record for job in jobs]]
    return atomic_write_text(path, "\n".join(lines) + "\n")


# ---------------------------------------------------------------- model and LoRA

def check_model_path(model_path: str, local_files_only: bool) -> None:
    """Reject what cannot be a FLUX pipeline before spending time loading it."""
    if os.path.isdir(model_path):
        if os.path.isfile(os.path.join(model_path, LORA_WEIGHT_NAME)) and not os.path.isfile(
                os.path.join(model_path, "model_index.json")):
            raise UserError(f"--model_path {model_path!r} is not a FLUX pipeline folder: it has no model_index.json "
                            f"(it holds LoRA weights: pass it as --lora_weights with a base --model_path)")
        check_pipeline_folder(model_path, "--model_path")
        return
    if os.path.exists(model_path):
        raise UserError(f"--model_path {model_path!r} is a file; give the pipeline folder (the one with model_index.json)")
    if not is_hub_id(model_path):
        raise UserError(f"--model_path {model_path!r} does not exist; give a FLUX pipeline folder")
    if local_files_only or hf_offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_path, "model_index.json")
        if not isinstance(cached, str):
            raise UserError(f"--model_path {model_path!r} is not a local folder and is not in the Hugging Face cache; "
                            f"pass --model_path DIR (a FLUX pipeline folder) or download it first "
                            f"(hf download {model_path}), or allow downloads with "
                            + ("--no-local_files_only" if local_files_only else "HF_HUB_OFFLINE=0"))
        problem = pipeline_folder_problem(os.path.dirname(cached))  # the cached snapshot: name what is missing
        if problem:
            raise UserError(f"--model_path {model_path!r}: its copy in the Hugging Face cache {problem}; complete the "
                            f"download (hf download {model_path})")


def load_pipeline(model_path: str, dtype, local_files_only: bool, quantization: str = "none", device_type: str = "cpu",
                  family=None, text_quantization: str = "none", text_device="cpu"):
    """The pipeline at model_path in `dtype` (the family's class, fluxkit.families; default: the
    folder's), its transformer quantized as asked (fluxkit.weights.quant), its text encoders loaded
    by the family (load_text_encoders)."""
    family = family or (families.of_folder(model_path) if os.path.isdir(model_path) else families.get("flux1"))
    try:
        parts = load_text_encoders(family, model_path, text_quantization, dtype, text_device, local_files_only)
        if quantization != "none":
            parts["transformer"] = quant.load_transformer(model_path, quantization, dtype, device_type, subfolder="transformer",
                                                          local_files_only=local_files_only,
                                                          model_class=family.component_class("transformer"))
        pipe = family.load_pipeline(model_path, local_files_only=local_files_only, **parts, **quant.dtype_kwarg(dtype))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"--model_path {model_path!r} could not be loaded as a FLUX pipeline: {first_line}") from None
    return pipe


def load_text_encoders(family, model_path: str, quantization: str, dtype, device, local_files_only: bool) -> dict:
    """The family's text encoders as its load_component gives them, as the trainers load them: quantized
    onto `device` as --text_encoder_quantization asks (the host never holds them whole), else in `dtype`."""
    def load(name):
        encoder = family.load_component(name, model_path, quantization, dtype, device, local_files_only=local_files_only)
        quant.place(encoder, dtype=dtype)  # as stored (transformers' "auto"), then cast, unless quantized
        return encoder

    return {name: load(name) for name in family.text_encoders}


# ---------------------------------------------------------------- speed-ups and devices

def enable_first_block_cache(pipe, threshold: float) -> None:
    import diffusers

    try:
        from diffusers.hooks import FirstBlockCacheConfig
    except ImportError:
        raise UserError(f"--first_block_cache needs a diffusers with FirstBlockCacheConfig (0.35 or newer); "
                        f"{diffusers.__version__} is installed: upgrade diffusers or drop the flag") from None
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))


def compile_transformer(pipe, backend: str) -> None:
    import torch

    try:
        pipe.transformer.compile(backend=backend)
    except Exception as err:  # torch reports an unknown backend with its own exception types
        known = ", ".join(torch.compiler.list_backends())
        raise UserError(f"--compile_backend {backend!r} is not available ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                        f"known here: {known}") from None


def apply_npu_patches(fused_attention: bool) -> list:
    """float32 RoPE and torch_npu's fused attention from the toolkit's patch module (imported
    only on npu, and before the pipeline is built: the attention patch acts on construction).
    Returns (name, applied, why) per patch."""
    from ..upstream import patches

    if fused_attention:
        # the patch is opt-in for training scripts; an explicit FLUXKIT_NPU_FLASH_ATTENTION=0 still wins
        os.environ.setdefault(patches.ENV_NPU_ATTENTION, "1")
    return patches.apply(["rope-float32", "npu-fused-attention"])


# ---------------------------------------------------------------- the run

def settings_of(args, model_id: str, lora_file: str | None, embeddings: str | None, family) -> dict:
    """Everything besides prompt and seed that changes an image's pixels (and so its file name).

    Left out on purpose, because they change only kernel rounding and a run resumed elsewhere must
    not start over: the device, the process grid (context-parallel images match single-process ones
    within 1e-5 in fp32, a few levels (up to 4/255 measured) in bf16), and the batch size in fp32 (at most 1/255). In bf16 and fp16
    the batch size moves pixels by up to 2/255, so there it is part of the recipe."""
    settings = {
        "model": model_id,
        "lora": lora_file,
        "lora_scale": args.lora_scale if lora_file else None,
        "fuse_lora": bool(args.fuse_lora and lora_file),
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "width": args.width,
        "max_sequence_length": args.max_sequence_length,
        "dtype": args.dtype,
        "first_block_cache": args.first_block_cache,
    }
    if args.dtype != "fp32":
        settings["batch_size"] = args.batch_size
    if args.base_quantization != "none":  # absent when unquantized: earlier runs' file names stay valid
        settings["base_quantization"] = args.base_quantization
    if args.text_encoder_quantization != "none":  # likewise
        settings["text_encoder_quantization"] = args.text_encoder_quantization
    if embeddings:  # likewise absent without pivotal tuning's new tokens
        settings["embeddings"] = embeddings
    if args.model_family and family.pipeline_name != _own_pipeline(args.model_path):
        settings["model_family"] = family.name  # a folder run as another family (FLUX.1 as Kontext): another pipeline
    return settings


def _own_pipeline(model_path: str) -> str:
    """The pipeline class a model runs as without --model_family (a hub id: FLUX.1's, as inference_family)."""
    return families.pipeline_class_name(model_path) if os.path.isdir(model_path) else families.get("flux1").pipeline_name


def inference_family(args):
    """The run's family (fluxkit.families): --model_family, else the folder's; FLUX.1 for a hub id."""
    if os.path.isdir(args.model_path):
        return families.of_folder(args.model_path, args.model_family)
    return families.get(args.model_family or "flux1")


def check_reference_images(requests: list, family, args) -> None:
    """Each reference image: a readable image, asked of an editing family."""
    for path in dict.fromkeys(r.image for r in requests if r.image):
        named = "--image" if path == args.image else f"--prompts_file {args.prompts_file!r}: image"
        if not family.editing:
            raise UserError(f"{named} {path!r} edits a reference image, but {args.model_path!r} runs as {family.name} "
                            "(text-to-image); use a Kontext or FLUX.2 model, or --model_family kontext on a FLUX.1 folder")
        if not os.path.isfile(path):
            raise UserError(f"{named} {path!r} is not a file; give the reference image to edit")
        from ..data.scan import inspect_image

        try:
            (w, h), _ = inspect_image(path, path)
        except Exception as err:
            raise UserError(f"{named} {path!r} cannot be read as an image ({type(err).__name__}: {str(err)[:120]}); "
                            "replace it with a PNG/JPEG/WebP") from None
        if min(w, h) < family.min_reference_side:
            raise UserError(f"{named} {path!r} is {w}x{h}; {family.name} takes reference images of at least "
                            f"{family.min_reference_side} pixels a side: use a larger one")


@functools.lru_cache(maxsize=8)
def _reference_image(path: str):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def check_before_loading(args, defaults: ScriptDefaults):
    """Everything that can be checked without the model, on every rank alike: (prompts, LoRA file,
    embeddings file, device info, process grid, attention backend, model family)."""
    from ..shared.device import detect

    requests = collect_prompts(args, defaults)
    lora_weights, embeddings = pivotal.inference_files(args.lora_weights, args.embeddings)
    lora_file = os.path.realpath(resolve_lora_file(lora_weights)) if lora_weights else None
    if embeddings:  # pivotal tuning: TOK in a prompt becomes the trained tokens, as in training
        embeddings = os.path.realpath(embeddings)
        rewritten = pivotal.rewrite_inference_prompts([r.prompt for r in requests], embeddings)
        requests = [Request(p, r.image) for p, r in zip(rewritten, requests)]
    if lora_file:  # its header only: a file that is no LoRA, or text-encoder layers a quantized encoder cannot take
        quant.refuse_text_encoder_lora(args.text_encoder_quantization, lora_file, lora_components(lora_file))
    check_model_path(args.model_path, args.local_files_only)
    family = inference_family(args)
    if embeddings and not family.trains_text_encoder:
        raise UserError(f"--embeddings {embeddings!r} holds pivotal tuning's tokens for FLUX.1's CLIP and T5, which "
                        f"{family.name} does not have; drop it (or give a FLUX.1 or Kontext model)")
    apply_family_defaults(args, family)
    check_reference_images(requests, family, args)
    info = detect(args.device)
    if not info.supports(args.dtype):
        raise UserError(f"--dtype {args.dtype} is not supported on {info.type}; use bf16 or fp32")
    quant.check(args.base_quantization, info.type)
    quant.check_text_encoder(args.text_encoder_quantization, info.type)
    grid = plan_grid(world_size(), args.ulysses_degree, args.ring_degree)
    backend = choose_attention_backend(args.attention_backend, info.type, args.npu_flash_attention, grid)
    check_backend_for_grid(backend, grid)
    if args.first_block_cache is not None and not family.first_block_cache:
        raise UserError(f"--first_block_cache cannot run on {family.name}: diffusers' first-block cache cannot take "
                        "FLUX.2's transformer blocks (their outputs are lists); drop the flag")
    if grid.group_size > 1 and args.first_block_cache is not None:
        raise UserError("--first_block_cache cannot be combined with --ulysses_degree/--ring_degree: each process "
                        "would decide on its own share of the tokens whether to skip blocks; drop one of them")
    return requests, lora_file, embeddings, info, grid, backend, family


def run(args, defaults: ScriptDefaults) -> dict:
    t_start = time.perf_counter()
    requests, lora_file, embeddings, info, grid, backend, family = check_before_loading(args, defaults)
    output_dir = check_output_dir(args.output_dir)
    model_id = os.path.realpath(args.model_path) if os.path.isdir(args.model_path) else args.model_path
    jobs = plan_jobs(requests, args.seeds, settings_of(args, model_id, lora_file, embeddings, family))

    state = distributed_state(info.type)
    shortfall = launch_shortfall(state.num_processes, info.type, info.count)
    if shortfall and state.is_main_process:
        print(f"warning: {shortfall}", file=sys.stderr, flush=True)
    pipe = prepare_pipeline(args, info, state, lora_file, grid, backend, embeddings, family,
                            references=sorted({j.image for j in jobs if j.image}))
    load_seconds = time.perf_counter() - t_start

    # Every rank must list existing files before any rank writes one, or the shares would differ.
    pending = [j for j in jobs if args.overwrite or not os.path.isfile(os.path.join(output_dir, j.file))]
    make_output_dir(output_dir)  # only now: a run that fails before rendering leaves nothing behind
    state.wait_for_everyone()
    group, member = grid.place(state.process_index)
    t_render = time.perf_counter()
    first_batch_seconds = render(pipe, shard(pending, group, grid.groups), args, output_dir,
                                 write=member == 0, show=state.is_main_process, grid=grid, family=family)
    state.wait_for_everyone()
    seconds = time.perf_counter() - t_render
    # every rank computed the same `pending`, so the shares are known without exchanging objects
    per_group = [len(shard(pending, g, grid.groups)) for g in range(grid.groups)]
    per_process = [per_group[g] if m == 0 else 0 for g, m in map(grid.place, range(grid.processes))]
    written = sum(per_group)
    summary = {
        "images_written": written,
        "images_skipped": len(jobs) - len(pending),
        "seconds": round(seconds, 4),
        "sec_per_image": round(seconds / written, 4) if written else None,
        "transformer_steps_per_sec": round(written * args.num_inference_steps / seconds, 4) if written else None,
        "num_processes": state.num_processes,
        "grid": grid.as_dict(),
        "images_per_process": per_process,
        "images_per_group": per_group,
        "attention_backend": backend,
        "first_batch_seconds": None if first_batch_seconds is None else round(first_batch_seconds, 4),
        "load_seconds": round(load_seconds, 4),
        "e2e_seconds": round(time.perf_counter() - t_start, 4),
        "batch_size": args.batch_size,
        "device": info.type,
        "dtype": args.dtype,
        "height": args.height,
        "width": args.width,
        "num_inference_steps": args.num_inference_steps,
        "output_dir": os.path.abspath(output_dir),
    }
    if state.is_main_process:
        write_manifest(output_dir, jobs)
        atomic_write_json(os.path.join(output_dir, SUMMARY), summary)
        per_image = f"{summary['sec_per_image']:.3f} s/image" if written else "nothing to render"
        print(f"wrote {written} image{'' if written == 1 else 's'} ({summary['images_skipped']} already there, skipped) to {output_dir} "
              f"in {seconds:.1f} s: {per_image}; {state.num_processes} process(es), grid {grid.describe()}", flush=True)
    # Tear gloo down explicitly: left to interpreter exit, its threads can abort the process
    # ("terminate called without an active exception") after all the work is done.
    state.destroy_process_group()
    return summary


def prepare_pipeline(args, info, state, lora_file: str | None, grid, backend: str, embeddings: str | None = None,
                     family=None, references=()):
    """The pipeline on this process's device with the LoRA, pivotal tuning's tokens, the attention
    split and the speed-ups asked for."""
    from ..shared.device import torch_dtype

    def report(results):
        for name, applied, why in results:
            if state.is_main_process:
                print(f"patch {name}: {'applied' if applied else 'skipped'} ({why})", flush=True)

    if info.type == "npu":
        report(apply_npu_patches(args.npu_flash_attention))
    pipe = load_pipeline(args.model_path, torch_dtype(args.dtype), args.local_files_only, args.base_quantization, info.type,
                         family, args.text_encoder_quantization, state.device)
    family.check_prompt_room(pipe.tokenizer, args.max_sequence_length)
    if lora_file:
        attach_lora(pipe, lora_file, args.lora_scale, args.fuse_lora)
    if embeddings:
        tokens = pivotal.load_embeddings(pipe, embeddings)
        if state.is_main_process:
            print(f"new tokens {''.join(tokens)} from {embeddings}", flush=True)
    pipe.to(state.device)
    pipe.set_progress_bar_config(disable=True)  # ours counts images; the pipeline's would count steps
    if args.attention_backend != "auto" or grid.group_size > 1:
        check_sequence_split(pipe, grid, args.height, args.width, args.max_sequence_length,
                             sorted({_reference_image(path).size for path in references}))
        report(enable_context_parallel(pipe.transformer, grid, backend, info.type))
    if args.first_block_cache is not None:
        enable_first_block_cache(pipe, args.first_block_cache)
    if args.compile:
        compile_transformer(pipe, args.compile_backend)
    return pipe


def batches(jobs: list[Job], size: int) -> list[list[Job]]:
    """Consecutive jobs in batches of at most `size`, a batch sharing one reference image (the
    pipelines take one per call)."""
    out: list[list[Job]] = []
    for job in jobs:
        if out and len(out[-1]) < size and out[-1][-1].image == job.image:
            out[-1].append(job)
        else:
            out.append([job])
    return out


def render(pipe, jobs: list[Job], args, output_dir: str, write: bool, show: bool, grid, family) -> float | None:
    """Render jobs batch by batch (every member of a group runs the same calls); write them if `write`.
    Returns the first batch's seconds (None when there was nothing to render).

    In bf16/fp16 the batch size changes pixels (it is in the file names there), so a short last
    batch is padded with copies of its last image: every image is rendered in a batch of exactly
    --batch_size, the recipe its name promises."""
    import torch
    from tqdm import tqdm

    pad = args.dtype != "fp32"
    first_batch_seconds = None
    label = "images" if grid.processes == 1 else f"rank 0 of {grid.processes}, group 0 of {grid.groups}"
    bar = tqdm(total=len(jobs), unit="image", disable=not show, desc=label)
    for batch in batches(jobs, args.batch_size):
        call = batch + [batch[-1]] * (args.batch_size - len(batch)) if pad else batch
        t_batch = time.perf_counter()
        # one reference for the batch, as its family's pipeline takes it (or none)
        edit = family.render_call(batch[0].image and _reference_image(batch[0].image), args.height, args.width)
        # the first-block cache keeps its state in the transformer's cache context: FluxPipeline opens one around
        # each transformer call, Kontext's pipeline none (diffusers 0.42), so one spans the whole call
        with pipe.transformer.cache_context("cond") if args.first_block_cache is not None else contextlib.nullcontext():
            images = pipe(
                **edit, prompt=[j.prompt for j in call],
                generator=[torch.Generator("cpu").manual_seed(j.seed) for j in call],
                num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                height=args.height, width=args.width, max_sequence_length=args.max_sequence_length,
            ).images
        if write:
            for job, image in zip(batch, images):
                save_png(image, os.path.join(output_dir, job.file), job.record)
        if first_batch_seconds is None:
            first_batch_seconds = time.perf_counter() - t_batch
        bar.update(len(batch))
    bar.close()
    return first_batch_seconds


def main(defaults: ScriptDefaults, argv=None) -> int:
    """Entry point of the four scripts (wrapped by errors.cli there)."""
    try:
        args = parse_args(defaults, argv)
        host_runtime.leave_out(quant.libraries_not_needed(args.base_quantization, False, args.model_path,
                                                                args.text_encoder_quantization))
        quiet.install()
        run(args, defaults)
    except UserError:
        if not is_rank0():
            # Every rank checks the same inputs; one report (rank 0's) is enough.
            raise SystemExit(2) from None
        raise
    return 0
