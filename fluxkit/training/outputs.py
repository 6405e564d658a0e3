"""What a training run leaves behind besides checkpoints: class images for prior preservation,
validation grids (also sent to TensorBoard), the final weights (a LoRA file, or a complete
pipeline folder published component by component), the LoRA model card and the hub upload.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import torch

from ..shared import fsio
from ..checkpoint import complete_checkpoints
from ..data.scan import IMAGE_EXTENSIONS, list_images
from ..shared.device import torch_dtype
from ..shared.environment import hf_offline
from ..shared.errors import UserError
from ..weights.lora import save_lora_gathered, unwrap_model
from ..families import of_args
from .models import resolve_model_dir
from .offload import encoders_visiting
from ..weights.zero3 import save_pretrained_gathered
from .card_code import card_code

# A storage error's cause is judged by a probe write of this size (room for a safetensors header is not enough).
_PROBE_BYTES = 1 << 20


# ------------------------------------------------------------------------------ class images

def prepare_class_images(args, accelerator, info) -> list[str]:
    """Fill --class_data_dir up to --num_class_images with images from the base model."""
    os.makedirs(args.class_data_dir, exist_ok=True)
    have = len([f for f in os.listdir(args.class_data_dir) if f.lower().endswith(IMAGE_EXTENSIONS)])
    if have < args.num_class_images:
        dtype = torch_dtype(args.prior_generation_precision or ("bf16" if info.type != "cpu" else "fp32"))
        model_dir = resolve_model_dir(args)
        family = of_args(args, model_dir)
        pipe = family.load_pipeline(model_dir, torch_dtype=dtype, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(accelerator.device)
        todo = list(range(have, args.num_class_images))
        mine = todo[accelerator.process_index::accelerator.num_processes]
        from tqdm.auto import tqdm

        for start in tqdm(range(0, len(mine), args.sample_batch_size), desc="class images", disable=not accelerator.is_local_main_process):
            chunk = mine[start:start + args.sample_batch_size]
            gens = [torch.Generator().manual_seed((args.seed or 0) * 1000003 + i) for i in chunk]
            # prompt by name: FLUX.2 [klein]'s first argument is the image
            images = pipe(prompt=[args.class_prompt] * len(chunk), **family.render_call(None, args.resolution, args.resolution),
                          height=args.resolution, width=args.resolution,
                          num_inference_steps=args.num_validation_steps, generator=gens).images
            for i, image in zip(chunk, images):
                fsio.atomic_write(os.path.join(args.class_data_dir, f"class_{i:05d}.png"), lambda f: image.save(f, format="PNG"))
        del pipe
        accelerator.wait_for_everyone()
    return list_images(args.class_data_dir, "--class_data_dir")[: args.num_class_images]


# ------------------------------------------------------------------------------ validation

def run_validation(args, accelerator, m, transformer, text_encoder, weight_dtype, tag, prompt_embeds=None) -> list[str]:
    """Render num_validation_images for validation_prompt (m: the run's Models); save a PNG grid
    and log the images to TensorBoard. tag: the epoch number, or a name such as 'final'.
    prompt_embeds: (sequence, pooled) of the prompt, when the text encoders are not loaded.

    Under ZeRO-3 every rank calls it: each layer of the sharded transformer gathers its parameters
    from all ranks, so all render the same images in lockstep; only the main process writes."""
    from diffusers.utils import make_image_grid
    from PIL import Image
    from tqdm.auto import tqdm

    pipe = m.family.pipeline(m, unwrap_model(transformer), unwrap_model(text_encoder) if text_encoder is not None else None)
    pipe.set_progress_bar_config(disable=True)
    was_training = pipe.transformer.training
    pipe.transformer.eval()
    images = []
    with torch.no_grad(), accelerator.autocast(), encoders_visiting(args, m, accelerator.device):
        for i in tqdm(range(args.num_validation_images), desc=f"validation ({tag})", unit="image",
                      disable=not accelerator.is_local_main_process):
            g = torch.Generator(device="cpu").manual_seed((args.seed or 0) + i)
            embeds = None if prompt_embeds is None else tuple(e.to(weight_dtype) for e in prompt_embeds)
            text = m.family.validation_text(args.validation_prompt, embeds, args)
            # the family's render arguments (Kontext: keep --resolution; its pipeline would scale to 1 MP)
            images.append(pipe(**text, **m.family.render_call(None, args.resolution, args.resolution),
                               height=args.resolution, width=args.resolution,
                               num_inference_steps=args.num_validation_steps, guidance_scale=args.guidance_scale,
                               generator=g).images[0])
    if was_training:
        pipe.transformer.train()
    if not accelerator.is_main_process:
        return []
    out_dir = os.path.join(args.output_dir, "validation")
    os.makedirs(out_dir, exist_ok=True)
    cols = min(4, len(images))
    rows = math.ceil(len(images) / cols)
    blank = Image.new("RGB", images[0].size)  # fills the last row
    grid = make_image_grid(images + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)
    name = f"validation-{tag if isinstance(tag, str) else f'epoch-{tag}'}.png"
    path = fsio.atomic_write(os.path.join(out_dir, name), lambda f: grid.save(f, format="PNG"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), 0 if isinstance(tag, str) else tag, dataformats="NHWC")
    return [path]


# ------------------------------------------------------------------------------ final weights

def save_final(args, m, transformer, text_encoder, weight_dtype, main: bool = True) -> None:
    """The trained weights in output_dir; a full disk or a read-only folder is one clear line.

    Every rank calls it: under ZeRO-3 the weights are gathered from all ranks first (a collective);
    only the main process (main=True) writes."""
    try:
        _write_final(args, m, transformer, text_encoder, weight_dtype, main)
    except Exception as err:
        reason = fsio.write_failure(err, args.output_dir, probe_bytes=_PROBE_BYTES)
        if reason is None:
            raise
        found = complete_checkpoints(args.output_dir)
        keep = f"{found[-1][1]!r} is intact" if found else "no checkpoint was written"
        raise UserError(f"could not write the final weights to {args.output_dir!r}: {reason}; {keep}; free disk space "
                        "or fix permissions, then rerun with --resume_from_checkpoint latest") from None


def _write_final(args, m, transformer, text_encoder, weight_dtype, main: bool) -> None:
    if args.lora:
        from .pivotal import writes_lora

        if not writes_lora(args):  # textual inversion only: the embeddings file is the result
            return
        dtype = torch.float32 if args.upcast_before_saving else weight_dtype
        save_lora_gathered(args.output_dir, main, transformer, text_encoder, dtype)
        return
    from tqdm.auto import tqdm

    # Full fine-tune: a complete pipeline folder; untouched components are copied from the base model.
    # Each component is staged and published, so a failure never leaves half a component.
    trained = {"transformer": unwrap_model(transformer)}
    if text_encoder is not None:
        trained["text_encoder"] = unwrap_model(text_encoder)
    for name in tqdm([*m.family.components, "transformer"], desc="saving the pipeline", unit="component", disable=not main):
        if not main:
            if name in trained:  # take part in the ZeRO-3 gather; rank 0 writes
                save_pretrained_gathered(trained[name], None, main=False)
            continue
        final = os.path.join(args.output_dir, name)
        staging = fsio.staging_dir(final)
        try:
            if name in trained:
                save_pretrained_gathered(trained[name], staging, main=True)
            else:
                shutil.copytree(os.path.join(m.model_dir, name), staging, dirs_exist_ok=True)
            fsio.publish_dir(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if main:  # the base's index naming the family trained: a FLUX.1 folder trained as Kontext is a Kontext pipeline
        with open(os.path.join(m.model_dir, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
        index["_class_name"] = m.family.pipeline_name
        fsio.atomic_write_json(os.path.join(args.output_dir, "model_index.json"), index)


# ------------------------------------------------------------------------------ model card and hub

def write_model_card(args, sample_images: list[str], pivot, family) -> None:
    from .pivotal import model_card_usage

    flags = {k: v for k, v in vars(args).items() if k not in ("hub_token", "local_rank") and v not in (None, False)}
    lines = [
        "---", f"base_model: {args.pretrained_model_name_or_path}", "library_name: diffusers", "tags:",
        "- flux", "- text-to-image", "- lora", "- dreambooth", f"instance_prompt: {args.instance_prompt}", "---", "",
        f"# FLUX DreamBooth LoRA", "",
        f"LoRA weights (rank {args.rank}, alpha {args.lora_alpha}) for `{args.pretrained_model_name_or_path}`, "
        f"trained with fluxkit's train_flux_dreambooth_lora.py.", "",
        f"Trigger prompt: `{args.instance_prompt}`", "",
    ]
    lines += model_card_usage(args, pivot, family) if pivot is not None else card_code(
        args, family, args.instance_prompt, after_load=["pipe.load_lora_weights('.', weight_name='pytorch_lora_weights.safetensors')"])
    lines += ["", "## Training flags", ""]
    lines += [f"- `{k}`: `{v}`" for k, v in sorted(flags.items())]
    if sample_images:
        lines += ["", "## Samples", ""] + [f"![sample]({os.path.relpath(p, args.output_dir)})" for p in sample_images]
    fsio.atomic_write_text(os.path.join(args.output_dir, "README.md"), "\n".join(lines) + "\n")


def check_hub_reachable() -> None:
    """Fail before training, not after hours of it, when --push_to_hub cannot work."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    fix = "train without --push_to_hub and upload the output folder later with `hf upload`"
    if hf_offline():
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
