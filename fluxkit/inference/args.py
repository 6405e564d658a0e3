"""Command line of the four infer_flux_text2img_*.py scripts: the flags (the same for all four),
what each script defaults to (`ScriptDefaults`), the reference's prompt lists, and the prompts a
run asks for. Values are checked here, before anything heavy is imported."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from ..shared.errors import FlagParser, UserError
from ..families import NAMES, get as get_family
from ..weights.lora import LORA_WEIGHT_NAME
from ..weights.quant import add_flag as add_quantization_flag, add_text_encoder_flag

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
MAX_SEQUENCE_LENGTH = 512  # the text encoders' limit in every family's pipeline
# the flags whose default is the model family's (fluxkit.families: Family.inference_defaults)
FAMILY_DEFAULTED = ("height", "width", "guidance_scale", "max_sequence_length")


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
                "accelerate launch --multi_gpu --num_processes N infer_flux_text2img_distrib.py [FLAGS] "
                "(--multi_gpu also on CPU and NPU: without it accelerate starts one process). "
                "--ulysses_degree/--ring_degree also split each image over processes. LoRA is optional (--lora_weights).",
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
    from ..shared.device import DEVICE_CHOICES

    p = FlagParser(description=defaults.description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model_path", default=defaults.model_path,
                   help="a FluxPipeline folder (e.g. a full fine-tune's output_dir) or a hub id in the local cache (default: %(default)s)")
    g.add_argument("--model_family", default=None, choices=NAMES,
                   help="the model family; default: the one --model_path's model_index.json names (a FLUX.1 folder "
                        "also runs as kontext). It sets the defaults of --height, --width, --guidance_scale and "
                        "--max_sequence_length: " + "; ".join(f"{n} {_family_defaults(n)}" for n in NAMES))
    g.add_argument("--lora_weights", default=defaults.lora_weights,
                   help=f"LoRA weights: a .safetensors file, or a folder holding {LORA_WEIGHT_NAME} "
                        "(pickle formats such as .bin/.pt are refused) (default: %(default)s)")
    g.add_argument("--embeddings", default=None,
                   help="pivotal tuning's new token embeddings (OUTPUT_NAME_emb.safetensors, keys clip_l and t5); default: "
                        "the one beside --lora_weights. Their identifiers (e.g. TOK) in prompts become the trained tokens")
    g.add_argument("--lora_scale", type=float, default=1.0, help="strength of the LoRA; 0 gives the base model's images (default: %(default)s)")
    g.add_argument("--fuse_lora", action="store_true",
                   help="merge the LoRA into the weights before generating (faster; same images within rounding)")
    add_quantization_flag(g, "load the transformer's weights quantized")
    add_text_encoder_flag(g, "each image's metadata and file name record it")
    g.add_argument("--local_files_only", action=argparse.BooleanOptionalAction, default=True,
                   help="never download (the default); --no-local_files_only lets diffusers fetch a hub id")
    g = p.add_argument_group("what to generate")
    g.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeat the flag for several); default: the reference's prompt list")
    g.add_argument("--prompts_file", default=None,
                   help="a UTF-8 text file, one prompt per line (blank lines and lines starting with # are skipped); "
                        "or a .jsonl file, one {\"prompt\": ..., \"image\": REFERENCE} object per line, the image "
                        "(editing families; a path relative to the file's folder) optional, --image where absent")
    g.add_argument("--image", default=None,
                   help="editing families (Kontext, FLUX.2): the reference image every prompt edits; its path and "
                        "content hash go into each image's metadata, its content hash into the file name")
    g.add_argument("--seeds", type=_seed, nargs="+", default=list(REFERENCE_SEEDS),
                   help="one image per prompt and seed (default: the reference's %(default)s)")
    g.add_argument("--num_inference_steps", type=int, default=28, help="denoising steps (default: %(default)s)")
    g.add_argument("--height", type=int, default=None, help="image height in pixels, a multiple of 16 (default: the family's)")
    g.add_argument("--width", type=int, default=None, help="image width in pixels, a multiple of 16 (default: the family's)")
    g.add_argument("--guidance_scale", type=float, default=None,
                   help="FLUX.1's distilled guidance, FLUX.2's classifier-free guidance (default: the family pipeline's, "
                        "3.5 for FLUX.1 and Kontext, 4.0 for FLUX.2; the reference scripts used 1.0)")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help=f"prompt tokens, at most {MAX_SEQUENCE_LENGTH} (default: the family's, {MAX_SEQUENCE_LENGTH})")
    g = p.add_argument_group("how")
    g.add_argument("--batch_size", type=int, default=1,
                   help="images per pipeline call, per process group; in bf16/fp16 it changes pixels slightly, so it "
                        "is part of the file names there and a short last batch is padded (default: %(default)s)")
    g.add_argument("--output_dir", default=defaults.output_dir, help="where the PNGs, manifest.jsonl and infer_summary.json go (default: %(default)s)")
    g.add_argument("--overwrite", action="store_true", help="re-render images that already exist (default: skip them)")
    g.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="auto (the default) picks npu, then cuda, then cpu")
    g.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="weight and compute dtype (default: %(default)s; on a CPU without fast bf16, fp32 may be quicker)")
    g.add_argument("--npu_flash_attention", action=argparse.BooleanOptionalAction, default=True,
                   help="on Ascend, use torch_npu's fused attention via fluxkit.upstream.patches (default: on)")
    g.add_argument("--first_block_cache", type=float, default=None, metavar="THRESHOLD",
                   help="skip the remaining transformer blocks when the first block's output changes less than "
                        "THRESHOLD (diffusers' first-block cache, e.g. 0.05-0.12; faster, slightly different images); off by default")
    g.add_argument("--compile", action="store_true", help="torch.compile the transformer (slow first image, faster after)")
    g.add_argument("--compile_backend", default="inductor",
                   help="torch.compile backend for --compile (inductor on CUDA/CPU; on Ascend the one torch_npu's torchair registers; default: %(default)s)")
    g.add_argument("--attention_backend", default="auto",
                   help="diffusers attention backend: auto (the default) is torch SDPA ('native') on CPU and CUDA and "
                        "torch_npu's fused kernel ('_native_npu') on Ascend; others (flash, _native_cudnn, sage, ...) "
                        "only when asked for and installed")
    g = p.add_argument_group("several processes (accelerate launch --multi_gpu --num_processes N SCRIPT ...)")
    g.add_argument("--ulysses_degree", type=int, default=1, metavar="U",
                   help="split each image over U processes with Ulysses sequence parallelism (all-to-all around "
                        "attention); the N processes form N/(U*R) groups that each render their own share (default: 1)")
    g.add_argument("--ring_degree", type=int, default=1, metavar="R",
                   help="split each image over R processes with ring attention (needs a backend with log-sum-exp, "
                        "e.g. flash on CUDA; not native or _native_npu) (default: 1)")
    return p


def parse_args(defaults: ScriptDefaults, argv=None) -> argparse.Namespace:
    args = build_parser(defaults).parse_args(argv)
    check_values(args)
    if args.fuse_lora and not args.lora_weights:
        raise UserError("--fuse_lora needs --lora_weights")
    args.seeds = list(dict.fromkeys(args.seeds))  # a repeated seed would render the same file twice
    return args


def _family_defaults(name: str) -> str:
    return ", ".join(f"{k} {v}" for k, v in get_family(name).inference_defaults.items())


def apply_family_defaults(args, family) -> None:
    """Fill the flags left unset with the family's defaults (fluxkit.families), then check them."""
    for name in FAMILY_DEFAULTED:
        if getattr(args, name) is None:
            setattr(args, name, family.inference_defaults[name])
    check_values(args)


def check_values(args) -> None:
    """The numeric flags (those still None wait for the family's defaults)."""
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 16):
            raise UserError(f"--{name} {value} is not a positive multiple of 16 (FLUX packs 2x2 latent patches of the 8x VAE); "
                            f"use e.g. {max(16, (value // 16) * 16)}")
    if args.num_inference_steps < 1:
        raise UserError(f"--num_inference_steps {args.num_inference_steps} must be at least 1")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size} must be at least 1")
    if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise UserError(f"--max_sequence_length {args.max_sequence_length} must be between 1 and {MAX_SEQUENCE_LENGTH}")
    if args.first_block_cache is not None and not args.first_block_cache > 0:
        raise UserError(f"--first_block_cache {args.first_block_cache} must be a positive threshold such as 0.08")
    for name in ("ulysses_degree", "ring_degree"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)} must be at least 1 (1 = not split)")


@dataclass(frozen=True)
class Request:
    """One prompt to render, with the reference image it edits (None: text-to-image)."""

    prompt: str
    image: str | None = None


def _read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise UserError(f"--prompts_file {path!r} does not exist or is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"--prompts_file {path!r} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None


def _jsonl_request(path: str, number: int, line: str, image: str | None) -> Request:
    """One JSON object line: {"prompt": TEXT, "image": PATH} (image optional: --image's, or none)."""
    where = f"--prompts_file {path!r} line {number}"
    try:
        record = json.loads(line)
    except ValueError as err:
        raise UserError(f"{where} is not a JSON object ({err.msg}); write {{\"prompt\": \"...\", \"image\": \"ref.png\"}}") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        raise UserError(f"{where} has no \"prompt\" text; write {{\"prompt\": \"...\", \"image\": \"ref.png\"}}")
    unknown = sorted(set(record) - {"prompt", "image"})
    if unknown:
        raise UserError(f"{where} has unknown field(s) {', '.join(unknown)}; a line holds \"prompt\" and optionally \"image\"")
    ref = record.get("image", image)
    if ref is not None and not isinstance(ref, str):
        raise UserError(f"{where}: \"image\" must be a path (a string)")
    if ref is not None and "image" in record:  # relative to the prompts file, so the pair travels together
        ref = os.path.join(os.path.dirname(os.path.abspath(path)), ref)
    return Request(record["prompt"].strip(), ref)


def read_prompts_file(path: str, image: str | None = None) -> list[Request]:
    """A text file's prompts (each edits `image`), or a .jsonl file's prompt/image pairs."""
    lines = [(n, line.strip()) for n, line in enumerate(_read_lines(path), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise UserError(f"--prompts_file {path!r} has no prompts (only blank lines or # comments); add one prompt per line")
    if path.endswith(".jsonl"):
        return [_jsonl_request(path, n, line, image) for n, line in lines]
    return [Request(line, image) for _, line in lines]


def collect_prompts(args, defaults: ScriptDefaults) -> list[Request]:
    """--prompt flags, then --prompts_file lines; the script's default list when neither is given.
    Each edits --image unless its prompts-file line names its own."""
    if any(not p.strip() for p in args.prompt or []):
        raise UserError("--prompt is empty; give the text of the prompt")
    requests = [Request(p, args.image) for p in args.prompt or []]
    if args.prompts_file:
        requests += read_prompts_file(args.prompts_file, args.image)
    return list(dict.fromkeys(requests or [Request(p, args.image) for p in defaults.prompts]))
