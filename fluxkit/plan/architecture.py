"""The model a plan is made for, described by numbers only: parameter counts per component, the
transformer's config and the shapes of its nn.Linear layers, the VAE's widths. Read from a pipeline
folder's config.json files and counted on the meta device (no weights are read), or from a
fluxkit.tiny.build preset (`dev` is FLUX.1-dev's exact architecture). A model family (fluxkit.families)
may supply the same description for its own components."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field

from ..shared.errors import UserError

HUB_DEV_IDS = ("black-forest-labs/FLUX.1-dev",)
# read_architecture's memo of parameter counts: a folder (default ~/.cache/fluxkit/plan), or "off"
ARCHITECTURE_MEMO_ENV = "FLUXKIT_PLAN_MEMO"
MEMO_SCHEMA = 3  # bump when Architecture's fields change
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size: one fp32 absmax per 64 weights
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # the transformer's blocks, in forward order


@dataclass
class Architecture:
    """Parameter counts and the shapes the plan needs, from configs only."""
    source: str
    params: dict  # component -> parameter count
    transformer: dict  # the transformer's config
    vae_scale: int
    latent_channels: int
    vae_first_channels: int = 128  # VAE encoder's first block width: its feature maps dominate encoding
    vae_layers_per_block: int = 2
    linear_shapes: list = field(default_factory=list)  # (module name, in, out) of every transformer nn.Linear
    clip_linear_shapes: list = field(default_factory=list)
    # parameters of each transformer block in forward order (what --blocks_to_swap moves)
    block_params: list = field(default_factory=list)
    # the T5 encoder's width, feed-forward width and heads: its working set while it encodes
    text_encoder_shape: dict = field(default_factory=dict)

    @property
    def hidden(self) -> int:
        return self.transformer["num_attention_heads"] * self.transformer["attention_head_dim"]


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path!r} ({type(err).__name__}); point --pretrained_model_name_or_path "
                        "at a complete FLUX pipeline folder") from None


def component_configs(model: str, architecture: str | None = None) -> tuple[dict, str]:
    """{component: config dict} from a pipeline folder, or from a tiny.py preset."""
    from ..tiny.build import resolve_preset

    if architecture:
        p = resolve_preset(architecture)
        return {"transformer": p.transformer, "vae": p.vae, "text_encoder": p.clip, "text_encoder_2": p.t5}, f"preset {p.name}"
    if os.path.isdir(model):
        _check_family(model)
        comps = {c: _read_json(os.path.join(model, c, "config.json"))
                 for c in ("transformer", "vae", "text_encoder", "text_encoder_2")}
        return comps, model
    if model in HUB_DEV_IDS:
        return component_configs(model, "dev")
    raise UserError(f"--pretrained_model_name_or_path {model!r} is not a local pipeline folder; give one, or add "
                    "--architecture dev to plan FLUX.1-dev's architecture without its files")


def _check_family(model: str) -> None:
    """The plan's terms model FLUX.1's components (CLIP + T5); another family is named, not misread."""
    from ..families import get, of_folder

    try:
        family = of_folder(model)
    except UserError:
        return  # not a known pipeline: reading its configs names what is missing
    if family.components != get("flux1").components:
        raise UserError(f"{model!r} is a {family.name} pipeline ({family.pipeline_name}); the memory plan models "
                        "FLUX.1 and Kontext (CLIP + T5) only so far")


def read_architecture(model: str, architecture: str | None = None) -> Architecture:
    """Count every component's parameters on the meta device (nothing is allocated).

    Importing diffusers and transformers takes seconds, longer than the count itself, and the
    launchers plan every run (--dry_run too) before they start anything: the counts are kept in
    a small memo file per set of configs and library versions (ARCHITECTURE_MEMO), so only the
    first plan of a model pays for the imports."""
    configs, source = component_configs(model, architecture)
    memo = _memo_path(configs)
    if memo:
        try:
            with open(memo) as f:
                data = json.load(f)
            for shapes in ("linear_shapes", "clip_linear_shapes"):
                data[shapes] = [tuple(s) for s in data[shapes]]
            return Architecture(**{**data, "source": source})
        except (OSError, ValueError, TypeError, KeyError):
            pass  # not there yet, or unreadable: count again
    arch = _count_architecture(configs, source)
    if memo:
        try:
            from ..shared.fsio import atomic_write_json

            os.makedirs(os.path.dirname(memo), exist_ok=True)
            atomic_write_json(memo, asdict(arch), indent=None)
        except OSError:
            pass  # a read-only home: the plan still works, only slower
    return arch


def _memo_path(configs: dict) -> str | None:
    """Where the counts for these configs are memoised: keyed by the configs and by the versions
    of the libraries that build the modules (a new version may add or drop parameters)."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    if os.environ.get(ARCHITECTURE_MEMO_ENV) == "off":
        return None
    try:
        versions = [version(lib) for lib in ("diffusers", "transformers", "torch")]
    except PackageNotFoundError:
        return None
    key = json.dumps([MEMO_SCHEMA, versions, configs], sort_keys=True, default=str)
    base = os.environ.get(ARCHITECTURE_MEMO_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fluxkit", "plan")
    return os.path.join(base, hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def _count_architecture(configs: dict, source: str) -> Architecture:
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    with torch.device("meta"):
        models = {
            "transformer": FluxTransformer2DModel.from_config(strip(configs["transformer"])),
            "vae": AutoencoderKL.from_config(strip(configs["vae"])),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**strip(configs["text_encoder"]))),
            "text_encoder_2": T5EncoderModel(T5Config(**strip(configs["text_encoder_2"]))),
        }
    linears = lambda m: [(n, mod.in_features, mod.out_features) for n, mod in m.named_modules()  # noqa: E731
                         if isinstance(mod, torch.nn.Linear)]
    vae = configs["vae"]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    params = {k: count(m) for k, m in models.items()}
    params["vae_encoder"] = count(models["vae"].encoder) + count(models["vae"].quant_conv or torch.nn.Identity())
    blocks = [count(b) for name in BLOCK_LISTS for b in getattr(models["transformer"], name)]
    return Architecture(source=source, params=params, block_params=blocks,
                        transformer=dict(models["transformer"].config), vae_scale=2 ** (len(vae["block_out_channels"]) - 1),
                        latent_channels=vae["latent_channels"], vae_first_channels=vae["block_out_channels"][0],
                        vae_layers_per_block=vae.get("layers_per_block", 2), linear_shapes=linears(models["transformer"]),
                        clip_linear_shapes=linears(models["text_encoder"]),
                        text_encoder_shape={k: configs["text_encoder_2"].get(k) for k in ("d_model", "d_ff", "num_heads")})


def lora_parameter_count(shapes: list, targets: list[str], rank: int) -> int:
    """Parameters peft adds: rank x (in + out) for every nn.Linear whose name is or ends in a target."""
    return sum(rank * (i + o) for name, i, o in shapes if any(name == t or name.endswith("." + t) for t in targets))


def quantized_linear_bytes(shapes: list, quantization: str, dtype_bytes: int) -> tuple[int, int]:
    """(bytes of the quantized nn.Linear weights, their parameter count) of a frozen base."""
    numel = sum(i * o for _, i, o in shapes)
    if quantization in ("int8", "fp8"):  # torchao int8/float8 weight-only: 1-byte weights + one scale per output row
        return numel + sum(o for _, _, o in shapes) * dtype_bytes, numel
    if quantization == "nf4":  # bitsandbytes NF4: two weights per byte + an fp32 absmax per block
        return numel // 2 + math.ceil(numel / NF4_BLOCK) * 4, numel
    return numel * dtype_bytes, numel


def block_linear_shapes(shapes: list) -> list[list]:
    """The nn.Linear shapes of each transformer block, blocks in forward order (double-stream
    blocks, then single-stream ones): what --blocks_to_swap moves between host and device."""
    blocks: dict[tuple, list] = {}
    for name, i, o in shapes:
        m = re.match(r"(%s)\.(\d+)\." % "|".join(BLOCK_LISTS), name)
        if m:
            blocks.setdefault((BLOCK_LISTS.index(m.group(1)), int(m.group(2))), []).append((name, i, o))
    return [blocks[k] for k in sorted(blocks)]


def default_lora_targets() -> list[str]:
    from ..families import get

    return list(get("flux1").lora_targets)
