"""Text-to-image with FLUX pipelines: the logic behind the four infer_flux_text2img_*.py scripts.

The scripts differ only in their defaults (`ScriptDefaults`); everything else lives here:
the argument parser, prompt/seed expansion, output naming, PNG metadata, the manifest, LoRA
attach-and-verify, and the split of work over processes under `accelerate launch`.

Determinism: every (prompt, seed) pair gets its own CPU generator, so an image depends only on
its prompt, its seed and the settings, never on which process or batch renders it.

Resuming: an image's file name is derived from the prompt, the seed and every setting that
changes its pixels, so an existing file is exactly the image this run would produce and is
skipped (unless --overwrite). Files are written under a temporary name and renamed into place,
so an interrupted run never leaves a half-written image behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import tempfile
import time
import unicodedata
from dataclasses import dataclass

from .errors import UserError
from .lora import LORA_WEIGHT_NAME

REFERENCE_SEEDS = (8, 23, 42, 1334)

# The reference's prompt lists, kept verbatim (typos included) so that images can be compared
# with the ones the reference produced.
STYLE_PROMPTS = (
    "masterpiece, best quality, Cute dragon creature, pokemon style, night, moonlight, dim lighting",
    "masterpiece, best quality, Pikachu walking in beijing city, pokemon style, night, moonlight, dim lighting",
    "masterpiece, best quality, red panda , pokemon style, evening light, sunset, rim lighting",
    "masterpiece, best quality, Photo of (Lion:1.2) on a couch, flower in vase, dof, film grain, crystal clear, "
    "pokemon style, dark studio",
    "masterpiece, best quality, siberian cat pokemon on river, pokemon style, evening light, sunset, rim lighting, "
    "depth of field",
    "masterpiece, best quality, pig, Exquisite City, (sky:1.3), (Miniature tree:1.3), Miniature object, many flowers, "
    "glowing mushrooms, (creek:1.3), lots of fruits, cute colorful animal protagonist, Firefly, meteor, Colorful cloud, "
    "pokemon style, Complicated background, rainbow,",
    "masterpiece, best quality, (pokemon), a cute pikachu, girl with glasses, (masterpiece, top quality, best quality, "
    "official art, beautiful and aesthetic:1.2),",
    r"masterpiece, best quality, sugimori ken \(style\), (pokemon \(creature\)), pokemon electric type, grey and yellow "
    r"skin, mechanical arms, cyberpunk city background, night, neon light",
)
SUBJECT_PROMPTS = (
    "masterpiece, best quality, a sks dog in a bucket, night, moonlight, dim lighting",
    "masterpiece, best quality, a dog is walking in beijing city, night, moonlight, dim lighting",
    "masterpiece, best quality, a dog is holding a sign that sys hello world, evening light, sunset, rim lighting",
    "masterpiece, best quality, three big dogs on a couch, flower in vase, film grain, crystal clear, dark studio",
    "masterpiece, best quality, 8 cats and 8 dogs on river, evening light, sunset, rim lighting, depth of field",
    "masterpiece, best quality, 2 dogs, Exquisite City, (sky:1.3), (Miniature tree:1.3), Miniature object, many "
    "flowers, glowing mushrooms, (creek:1.3), lots of fruits, cute colorful animal protagonist, Firefly, meteor, "
    "Colorful cloud, Complicated background, rainbow,",
    "masterpiece, best quality, a cat is holding a sign that says hello world, girl with glasses, (masterpiece, top "
    "quality, best quality, official art, beautiful and aesthetic:1.2),",
    "masterpiece, best quality, two dog with grey and yellow skin, mechanical arms, cyberpunk city background, night, "
    "neon light",
)

HUB_MODEL = "black-forest-labs/FLUX.1-dev"
FULL_FINETUNE_OUTPUT = "output_flux_dreambooth"  # the full fine-tune launcher's default --output_dir
LORA_OUTPUT = "output_flux_dreambooth_lora"  # the LoRA launcher's default --output_dir
MANIFEST = "manifest.jsonl"
SUMMARY = "infer_summary.json"
ADAPTER = "fluxkit_lora"  # adapter name we give the LoRA, so we can find exactly its layers
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_SEQUENCE_LENGTH = 512  # T5's limit in FluxPipeline
SLUG_CHARS = 48
HASH_CHARS = 10  # 40 bits: collisions are negligible for any realistic number of prompts x seeds


@dataclass(frozen=True)
class ScriptDefaults:
    """What one entry script defaults to; the flags are the same for all four."""

    description: str
    model_path: str
    output_dir: str
    prompts: tuple
    lora_weights: str | None = None


BASE = ScriptDefaults(
    description="Text-to-image from a FLUX pipeline (the base model or a full fine-tune).",
    model_path=HUB_MODEL, output_dir="infer_result", prompts=STYLE_PROMPTS)
DREAMBOOTH = ScriptDefaults(
    description="Text-to-image from a full DreamBooth fine-tune (train_flux_dreambooth.py's output folder).",
    model_path=FULL_FINETUNE_OUTPUT, output_dir="infer_result_dreambooth", prompts=SUBJECT_PROMPTS)
LORA = ScriptDefaults(
    description="Text-to-image from a base FLUX pipeline plus DreamBooth-LoRA weights.",
    model_path=HUB_MODEL, output_dir="infer_result_lora", prompts=SUBJECT_PROMPTS, lora_weights=LORA_OUTPUT)
DISTRIB = ScriptDefaults(
    description="Text-to-image with prompts x seeds split over processes: "
                "accelerate launch --num_processes N infer_flux_text2img_distrib.py [FLAGS]. "
                "LoRA is optional (--lora_weights).",
    model_path=HUB_MODEL, output_dir="infer_result_distrib", prompts=STYLE_PROMPTS)


# ---------------------------------------------------------------- arguments

def _seed(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"seeds must be between 0 and 2**63-1, got {value}")
    return value


def build_parser(defaults: ScriptDefaults) -> argparse.ArgumentParser:
    from .device import DEVICE_CHOICES

    p = argparse.ArgumentParser(description=defaults.description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model_path", default=defaults.model_path,
                   help="a FluxPipeline folder (e.g. a full fine-tune's output_dir) or a hub id in the local cache (default: %(default)s)")
    g.add_argument("--lora_weights", default=defaults.lora_weights,
                   help=f"LoRA weights: a .safetensors file, or a folder holding {LORA_WEIGHT_NAME} "
                        "(pickle formats such as .bin/.pt are refused) (default: %(default)s)")
    g.add_argument("--lora_scale", type=float, default=1.0, help="strength of the LoRA; 0 gives the base model's images (default: %(default)s)")
    g.add_argument("--fuse_lora", action="store_true",
                   help="merge the LoRA into the weights before generating (faster; same images within rounding)")
    g.add_argument("--local_files_only", action=argparse.BooleanOptionalAction, default=True,
                   help="never download (the default); --no-local_files_only lets diffusers fetch a hub id")
    g = p.add_argument_group("what to generate")
    g.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeat the flag for several); default: the reference's prompt list")
    g.add_argument("--prompts_file", default=None,
                   help="a UTF-8 text file, one prompt per line; blank lines and lines starting with # are skipped")
    g.add_argument("--seeds", type=_seed, nargs="+", default=list(REFERENCE_SEEDS),
                   help="one image per prompt and seed (default: the reference's %(default)s)")
    g.add_argument("--num_inference_steps", type=int, default=28, help="denoising steps (default: %(default)s)")
    g.add_argument("--height", type=int, default=1024, help="image height in pixels, a multiple of 16 (default: %(default)s)")
    g.add_argument("--width", type=int, default=1024, help="image width in pixels, a multiple of 16 (default: %(default)s)")
    g.add_argument("--guidance_scale", type=float, default=3.5,
                   help="FLUX.1-dev's distilled guidance (default: %(default)s, FLUX.1-dev's recommended value; the reference scripts used 1.0)")
    g.add_argument("--max_sequence_length", type=int, default=MAX_SEQUENCE_LENGTH,
                   help=f"T5 prompt tokens, at most {MAX_SEQUENCE_LENGTH} (default: %(default)s)")
    g = p.add_argument_group("how")
    g.add_argument("--batch_size", type=int, default=1, help="images per pipeline call, per process (default: %(default)s)")
    g.add_argument("--output_dir", default=defaults.output_dir, help="where the PNGs, manifest.jsonl and infer_summary.json go (default: %(default)s)")
    g.add_argument("--overwrite", action="store_true", help="re-render images that already exist (default: skip them)")
    g.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="auto (the default) picks npu, then cuda, then cpu")
    g.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="weight and compute dtype (default: %(default)s; on a CPU without fast bf16, fp32 may be quicker)")
    g.add_argument("--npu_flash_attention", action=argparse.BooleanOptionalAction, default=True,
                   help="on Ascend, use torch_npu's fused attention via fluxkit.patches (default: on)")
    g.add_argument("--first_block_cache", type=float, default=None, metavar="THRESHOLD",
                   help="skip the remaining transformer blocks when the first block's output changes less than "
                        "THRESHOLD (diffusers' first-block cache, e.g. 0.05-0.12; faster, slightly different images); off by default")
    g.add_argument("--compile", action="store_true", help="torch.compile the transformer (slow first image, faster after)")
    g.add_argument("--compile_backend", default="inductor",
                   help="torch.compile backend for --compile (inductor on CUDA/CPU; on Ascend the one torch_npu's torchair registers; default: %(default)s)")
    return p


def parse_args(defaults: ScriptDefaults, argv=None) -> argparse.Namespace:
    args = build_parser(defaults).parse_args(argv)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value <= 0 or value % 16:
            raise UserError(f"--{name} {value} is not a positive multiple of 16 (FLUX packs 2x2 latent patches of the 8x VAE); "
                            f"use e.g. {max(16, (value // 16) * 16)}")
    if args.num_inference_steps < 1:
        raise UserError(f"--num_inference_steps {args.num_inference_steps} must be at least 1")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size} must be at least 1")
    if not 1 <= args.max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise UserError(f"--max_sequence_length {args.max_sequence_length} must be between 1 and {MAX_SEQUENCE_LENGTH}")
    if args.first_block_cache is not None and not args.first_block_cache > 0:
        raise UserError(f"--first_block_cache {args.first_block_cache} must be a positive threshold such as 0.08")
    if args.fuse_lora and not args.lora_weights:
        raise UserError("--fuse_lora needs --lora_weights")
    args.seeds = list(dict.fromkeys(args.seeds))  # a repeated seed would render the same file twice
    return args


def read_prompts_file(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise UserError(f"--prompts_file {path!r} does not exist or is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"--prompts_file {path!r} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    prompts = [line.strip() for line in lines]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(f"--prompts_file {path!r} has no prompts (only blank lines or # comments); add one prompt per line")
    return prompts


def collect_prompts(args, defaults: ScriptDefaults) -> list[str]:
    """--prompt flags, then --prompts_file lines; the script's default list when neither is given."""
    prompts = list(args.prompt or [])
    if any(not p.strip() for p in prompts):
        raise UserError("--prompt is empty; give the text of the prompt")
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    return list(dict.fromkeys(prompts or defaults.prompts))


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


def plan_jobs(prompts: list[str], seeds: list[int], settings: dict) -> list[Job]:
    """Every (prompt, seed) pair, prompt-major, in a fixed order every process agrees on."""
    jobs = []
    for prompt in prompts:
        for seed in seeds:
            name = image_name(prompt, seed, settings)
            jobs.append(Job(prompt, seed, name, {"file": name, "prompt": prompt, "seed": seed, **settings}))
    return jobs


def shard(items: list, index: int, count: int) -> list:
    """Process `index` of `count`'s contiguous share; shares differ in length by at most one."""
    base, extra = divmod(len(items), count)
    start = index * base + min(index, extra)
    return items[start:start + base + (1 if index < extra else 0)]


# ---------------------------------------------------------------- files

def prepare_output_dir(path: str) -> str:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--output_dir {path!r} is a file, not a folder; choose another path")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UserError(f"--output_dir {path!r} cannot be created ({err.strerror}); choose another folder") from None
    try:  # os.access is not enough: root passes it on read-only mounts
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise UserError(f"--output_dir {path!r} is not writable ({err.strerror}); choose another folder or fix its permissions") from None
    return path


def _atomic_write(path: str, write) -> None:
    """Write through a temporary file in the same folder and rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_png(image, path: str, record: dict) -> None:
    from PIL.PngImagePlugin import PngInfo

    from . import __version__

    info = PngInfo()
    for key, value in record.items():
        if key != "file":
            info.add_itxt(key, "" if value is None else str(value))  # iTXt: UTF-8, any prompt survives
    info.add_itxt("software", f"fluxkit {__version__}")
    _atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))


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
    _atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode("utf-8")))
    return path


def write_json(path: str, obj: dict) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode("utf-8")))


# ---------------------------------------------------------------- model and LoRA

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_path(model_path: str, local_files_only: bool) -> None:
    """Reject what cannot be a FLUX pipeline before spending time loading it."""
    if os.path.isdir(model_path):
        index = os.path.join(model_path, "model_index.json")
        if not os.path.isfile(index):
            hint = ""
            if os.path.isfile(os.path.join(model_path, LORA_WEIGHT_NAME)):
                hint = " (it holds LoRA weights: pass it as --lora_weights with a base --model_path)"
            raise UserError(f"--model_path {model_path!r} is not a FLUX pipeline folder: it has no model_index.json{hint}")
        try:
            with open(index, encoding="utf-8") as f:
                class_name = json.load(f).get("_class_name", "")
        except (OSError, ValueError, AttributeError):
            raise UserError(f"--model_path {model_path!r} has an unreadable model_index.json; re-download or re-save the pipeline") from None
        if "Flux" not in str(class_name):
            raise UserError(f"--model_path {model_path!r} holds a {class_name or 'unnamed'} pipeline, not a FLUX one; "
                            f"point it at a FLUX.1 pipeline folder")
        return
    if os.path.exists(model_path):
        raise UserError(f"--model_path {model_path!r} is a file; give the pipeline folder (the one with model_index.json)")
    if not _HUB_ID.match(model_path):
        raise UserError(f"--model_path {model_path!r} does not exist; give a FLUX pipeline folder")
    if local_files_only:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model_path, "model_index.json"), str):
            raise UserError(f"--model_path {model_path!r} is not a local folder and is not in the Hugging Face cache; "
                            f"pass --model_path DIR (a FLUX pipeline folder) or download it first "
                            f"(huggingface-cli download {model_path}), or allow downloads with --no-local_files_only")


def _dtype_kwarg(dtype) -> dict:
    # diffusers renamed from_pretrained's torch_dtype to dtype (the old name warns); older releases
    # only know torch_dtype.
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def load_pipeline(model_path: str, dtype, local_files_only: bool):
    from diffusers import FluxPipeline

    try:
        pipe = FluxPipeline.from_pretrained(model_path, local_files_only=local_files_only, **_dtype_kwarg(dtype))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"--model_path {model_path!r} could not be loaded as a FLUX pipeline: {first_line}") from None
    return pipe


def resolve_lora_file(path: str) -> str:
    """The one .safetensors file to load; pickle formats are refused without being opened."""
    if not os.path.exists(path):
        raise UserError(f"--lora_weights {path!r} does not exist; pass the LoRA trainer's output folder or its {LORA_WEIGHT_NAME}")
    if os.path.isdir(path):
        preferred = os.path.join(path, LORA_WEIGHT_NAME)
        if os.path.isfile(preferred):
            return preferred
        names = sorted(os.listdir(path))
        found = [n for n in names if n.endswith(".safetensors")]
        if len(found) == 1:
            return os.path.join(path, found[0])
        if len(found) > 1:
            raise UserError(f"--lora_weights folder {path!r} holds several .safetensors files ({', '.join(found)}); pass the file itself")
        pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickled:
            raise UserError(f"--lora_weights folder {path!r} holds only pickle weights ({', '.join(pickled)}), which are refused "
                            f"because loading them can run code; convert them to .safetensors")
        raise UserError(f"--lora_weights folder {path!r} holds no {LORA_WEIGHT_NAME} (no .safetensors file at all)")
    if path.endswith(PICKLE_SUFFIXES):
        raise UserError(f"--lora_weights {path!r} is a pickle file, refused because loading it can run code; "
                        f"convert it to .safetensors (safetensors.torch.save_file) or pass the trainer's {LORA_WEIGHT_NAME}")
    if not path.endswith(".safetensors"):
        raise UserError(f"--lora_weights {path!r} is not a .safetensors file; pass a .safetensors LoRA or its folder")
    return path


def read_lora_shapes(path: str) -> dict:
    """Tensor name -> shape, read from the safetensors header only (no tensor data, no pickle)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for any malformed header
        raise UserError(f"--lora_weights {path!r} is not a valid safetensors file ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if not any("lora" in k for k in shapes):
        raise UserError(f"--lora_weights {path!r} holds no LoRA tensors (no tensor name contains 'lora'); is it a full model checkpoint?")
    return shapes


# diffusers' FLUX LoRA format: <component>.<module path>.lora_A.weight / .lora_B.weight
_DIFFUSERS_LORA_KEY = re.compile(r"^(transformer|text_encoder)\.(.+)\.lora_([AB])\.weight$")


def _expected_lora_layers(shapes: dict) -> dict:
    """component -> {module path: {"A": shape, "B": shape}} for keys in diffusers' format."""
    layers: dict = {}
    for key, shape in shapes.items():
        m = _DIFFUSERS_LORA_KEY.match(key)
        if m:
            layers.setdefault(m.group(1), {}).setdefault(m.group(2), {})[m.group(3)] = shape
    return layers


def _check_lora_fits(pipe, path: str, expected: dict) -> None:
    """Every LoRA layer on an existing Linear must match its size: diffusers would otherwise widen
    the model's layers to fit a LoRA made for a bigger model. Unknown layers are caught by the
    count of attached layers after loading."""
    import torch

    for component, layers in expected.items():
        model = getattr(pipe, component, None)
        for module_path, ab in sorted(layers.items()):
            try:
                module = model.get_submodule(module_path)
            except AttributeError:
                continue  # diffusers may rename it (e.g. older CLIP layouts); the count after loading decides
            if not isinstance(module, torch.nn.Linear) or "A" not in ab or "B" not in ab:
                continue
            rank_in, rank_out = ab["A"][-1], ab["B"][0]
            if (rank_in, rank_out) != (module.in_features, module.out_features):
                raise UserError(f"--lora_weights {path!r} was made for another model size: {component}.{module_path} is "
                                f"{module.in_features}->{module.out_features} here but {rank_in}->{rank_out} in the LoRA; "
                                f"use a LoRA trained on this base model")


def count_attached_layers(model) -> int:
    """Layers of `model` that carry our adapter."""
    if model is None:
        return 0
    return sum(1 for m in model.modules() if ADAPTER in (getattr(m, "lora_A", None) or {}))


def attach_lora(pipe, path: str, scale: float, fuse: bool) -> dict:
    """Load the LoRA file into the pipeline, check it attached where it should, apply the scale.

    Returns {component: layers attached}. Fails with a UserError rather than run the base model
    when the adapter did not attach ("loaded nothing").
    """
    shapes = read_lora_shapes(path)
    expected = _expected_lora_layers(shapes)
    _check_lora_fits(pipe, path, expected)
    try:
        pipe.load_lora_weights(os.path.dirname(os.path.abspath(path)), weight_name=os.path.basename(path),
                               adapter_name=ADAPTER, use_safetensors=True, local_files_only=True)
    except (ValueError, RuntimeError, KeyError, OSError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"--lora_weights {path!r} does not fit this FLUX pipeline: {first_line}") from None
    attached = {c: count_attached_layers(getattr(pipe, c, None)) for c in ("transformer", "text_encoder")}
    if not any(attached.values()):
        raise UserError(f"--lora_weights {path!r} attached to no layer of this FLUX pipeline (its tensors name layers of "
                        f"another architecture, e.g. {sorted(shapes)[0]!r}); use a FLUX LoRA")
    for component, layers in expected.items():
        if attached[component] != len(layers):
            raise UserError(f"--lora_weights {path!r}: only {attached[component]} of its {len(layers)} {component} layers "
                            f"attached; it was made for another model")
    components = [c for c, n in attached.items() if n]
    if fuse:
        pipe.fuse_lora(components=components, lora_scale=scale, adapter_names=[ADAPTER])
        pipe.unload_lora_weights()  # the LoRA now lives in the base weights; drop the side layers
    else:
        pipe.set_adapters([ADAPTER], adapter_weights=[scale])
    return attached


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
    from . import patches

    if fused_attention:
        # the patch is opt-in for training scripts; an explicit FLUXKIT_NPU_FLASH_ATTENTION=0 still wins
        os.environ.setdefault(patches.ENV_NPU_ATTENTION, "1")
    return patches.apply(["rope-float32", "npu-fused-attention"])


def _distributed_state(info):
    from accelerate import PartialState

    if info.type == "cpu":
        # Without an accelerator, several processes talk over gloo.
        return PartialState(cpu=True, **({"backend": "gloo"} if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}))
    return PartialState()


# ---------------------------------------------------------------- the run

def settings_of(args, model_id: str, lora_file: str | None) -> dict:
    """Everything besides prompt and seed that changes an image's pixels (and so its file name).
    The device is left out on purpose: the same recipe on another machine is the same image up to
    kernel rounding, and a run resumed elsewhere must not start over."""
    return {
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


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run(args, defaults: ScriptDefaults) -> dict:
    t_start = time.perf_counter()
    from .device import detect, torch_dtype

    # Everything that can be checked without the model is checked first, on every rank alike.
    prompts = collect_prompts(args, defaults)
    lora_file = os.path.realpath(resolve_lora_file(args.lora_weights)) if args.lora_weights else None
    if lora_file:
        read_lora_shapes(lora_file)
    check_model_path(args.model_path, args.local_files_only)
    info = detect(args.device)
    if not info.supports(args.dtype):
        raise UserError(f"--dtype {args.dtype} is not supported on {info.type}; use bf16 or fp32")
    output_dir = prepare_output_dir(args.output_dir)
    model_id = os.path.realpath(args.model_path) if os.path.isdir(args.model_path) else args.model_path
    jobs = plan_jobs(prompts, args.seeds, settings_of(args, model_id, lora_file))

    import torch
    from tqdm import tqdm

    state = _distributed_state(info)
    if info.type == "npu":
        for name, applied, why in apply_npu_patches(args.npu_flash_attention):
            if state.is_main_process:
                print(f"patch {name}: {'applied' if applied else 'skipped'} ({why})", flush=True)
    pipe = load_pipeline(args.model_path, torch_dtype(args.dtype), args.local_files_only)
    if lora_file:
        attach_lora(pipe, lora_file, args.lora_scale, args.fuse_lora)
    pipe.to(state.device)
    pipe.set_progress_bar_config(disable=True)  # ours counts images; the pipeline's would count steps
    if args.first_block_cache is not None:
        enable_first_block_cache(pipe, args.first_block_cache)
    if args.compile:
        compile_transformer(pipe, args.compile_backend)
    load_seconds = time.perf_counter() - t_start

    # Every rank must list existing files before any rank writes one, or the shares would differ.
    pending = [j for j in jobs if args.overwrite or not os.path.isfile(os.path.join(output_dir, j.file))]
    state.wait_for_everyone()
    mine = shard(pending, state.process_index, state.num_processes)
    t_render = time.perf_counter()
    first_batch_seconds = None
    bar = tqdm(total=len(mine), unit="image", disable=not state.is_main_process,
               desc=f"rank 0 of {state.num_processes}" if state.num_processes > 1 else "images")
    for start in range(0, len(mine), args.batch_size):
        batch = mine[start:start + args.batch_size]
        t_batch = time.perf_counter()
        images = pipe(
            prompt=[j.prompt for j in batch],
            generator=[torch.Generator("cpu").manual_seed(j.seed) for j in batch],
            num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
            height=args.height, width=args.width, max_sequence_length=args.max_sequence_length,
        ).images
        for job, image in zip(batch, images):
            save_png(image, os.path.join(output_dir, job.file), job.record)
        if first_batch_seconds is None:
            first_batch_seconds = time.perf_counter() - t_batch
        bar.update(len(batch))
    bar.close()
    # every rank computed the same `pending`, so the shares are known without exchanging objects
    per_process = [len(shard(pending, rank, state.num_processes)) for rank in range(state.num_processes)]
    state.wait_for_everyone()
    seconds = time.perf_counter() - t_render
    written = sum(per_process)
    summary = {
        "images_written": written,
        "images_skipped": len(jobs) - len(pending),
        "seconds": round(seconds, 4),
        "sec_per_image": round(seconds / written, 4) if written else None,
        "transformer_steps_per_sec": round(written * args.num_inference_steps / seconds, 4) if written else None,
        "num_processes": state.num_processes,
        "images_per_process": per_process,
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
        write_json(os.path.join(output_dir, SUMMARY), summary)
        per_image = f"{summary['sec_per_image']:.3f} s/image" if written else "nothing to render"
        print(f"wrote {written} images ({summary['images_skipped']} already there, skipped) to {output_dir} "
              f"in {seconds:.1f} s: {per_image}", flush=True)
    # Tear gloo down explicitly: left to interpreter exit, its threads can abort the process
    # ("terminate called without an active exception") after all the work is done.
    state.destroy_process_group()
    return summary


def main(defaults: ScriptDefaults, argv=None) -> int:
    """Entry point of the four scripts (wrapped by errors.cli there)."""
    try:
        args = parse_args(defaults, argv)
        run(args, defaults)
    except UserError:
        if not _is_main_rank():
            # Every rank checks the same inputs; one report (rank 0's) is enough.
            raise SystemExit(2) from None
        raise
    return 0
