"""The model a plan is made for, described by numbers only: parameter counts per component, the
transformer's config and the shapes of its nn.Linear layers, the VAE's widths. Read from a pipeline
folder's config.json files and counted on the meta device (no weights are read), or from a
fluxkit.tiny.build preset (`dev` is FLUX.1-dev's exact architecture). The model family (fluxkit.families)
says which components there are, the classes that build them, and how the plan names its text
encoders; nothing here knows a family by name."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field

from ..shared.errors import UserError

# read_architecture's memo of parameter counts: a folder (default ~/.cache/fluxkit/plan), or "off"
ARCHITECTURE_MEMO_ENV = "FLUXKIT_PLAN_MEMO"
MEMO_SCHEMA = 9  # bump when Architecture's fields or what they count change (9: FLUX.2 text encoders' unread layers, klein's lm_head)
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size: one fp32 absmax per 64 weights
NF4_CODE_BYTES = 16 * 4  # each 4-bit layer's quantization state keeps its 16-value fp32 code table
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # the transformer's blocks, in forward order
# a text encoder's config keys, as the libraries spell them (T5's / the causal LMs')
_TEXT_KEYS = {"width": ("d_model", "hidden_size"), "ff": ("d_ff", "intermediate_size"),
              "heads": ("num_heads", "num_attention_heads"), "layers": ("num_layers", "num_hidden_layers")}


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
    # the nn.Linear shapes of the text encoder --train_text_encoder trains (FLUX.1's CLIP), if any
    trained_text_linear_shapes: list = field(default_factory=list)
    # parameters of each transformer block in forward order (what --blocks_to_swap moves)
    block_params: list = field(default_factory=list)
    family: str = "flux1"  # fluxkit.families name
    # each text encoder (Family.text_encoder_labels): component, label, role, params, the shape of its
    # working set while it encodes (width, ff, heads, layers, max_tokens, keeps_hidden_states) and what
    # bitsandbytes quantizes in it (quantization_facts)
    text_encoders: list = field(default_factory=list)

    @property
    def hidden(self) -> int:
        return self.transformer["num_attention_heads"] * self.transformer["attention_head_dim"]

    def text_encoder(self, role: str) -> dict | None:
        """The text encoder with this role ("pooled": FLUX.1's CLIP; "sequence": T5, Mistral3, Qwen3)."""
        return next((t for t in self.text_encoders if t["role"] == role), None)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path!r} ({type(err).__name__}); point --pretrained_model_name_or_path "
                        "at a complete FLUX pipeline folder") from None


def hub_architecture(model: str) -> tuple[str, str] | None:
    """(family, preset) of a hub id whose architecture the plan knows without its files."""
    from ..families import NAMES, get

    return next(((name, get(name).hub_presets[model]) for name in NAMES if model in get(name).hub_presets), None)


def component_configs(model: str, architecture: str | None = None, family: str | None = None) -> tuple[dict, str, str]:
    """({component: config dict}, where it came from, the family's name) from a pipeline folder, a
    known hub id, or a fluxkit.tiny preset of `family` (default FLUX.1)."""
    from ..families import get, of_folder

    if architecture:
        from ..tiny.build import resolve_preset

        fam = get(family or "flux1")
        configs = resolve_preset(architecture, fam.name).configs()
        return configs, f"preset {architecture}" + (f" ({fam.name})" if family else ""), fam.name
    if os.path.isdir(model):
        fam = of_folder(model, family) if family or os.path.isfile(os.path.join(model, "model_index.json")) else get("flux1")
        comps = {c: _read_json(os.path.join(model, c, "config.json")) for c in ("transformer", "vae", *fam.text_encoders)}
        return comps, model, fam.name
    known = hub_architecture(model)
    if known:
        return component_configs(model, known[1], family or known[0])
    raise UserError(f"--pretrained_model_name_or_path {model!r} is not a local pipeline folder; give one, or add "
                    "--architecture dev to plan FLUX.1-dev's architecture without its files (--model_family picks "
                    "another family's presets)")


def read_architecture(model: str, architecture: str | None = None, family: str | None = None,
                      text_layers=None) -> Architecture:
    """Count every component's parameters on the meta device (nothing is allocated), each text
    encoder as its family builds it for the hidden states prompts read (text_layers:
    --text_encoder_out_layers; None: the family's; Family.text_encoder_config).

    Importing diffusers and transformers takes seconds, longer than the count itself, and the
    launchers plan every run (--dry_run too) before they start anything: the counts are kept in
    a small memo file per set of configs and library versions (ARCHITECTURE_MEMO), so only the
    first plan of a model pays for the imports."""
    from ..families import get as get_family

    configs, source, family = component_configs(model, architecture, family)
    fam = get_family(family)
    configs = {name: (fam.text_encoder_config(config, text_layers) if name in fam.text_encoders else None) or config
               for name, config in configs.items()}
    memo = _memo_path(configs, family)
    if memo:
        try:
            with open(memo) as f:
                data = json.load(f)
            for shapes in ("linear_shapes", "trained_text_linear_shapes"):
                data[shapes] = [tuple(s) for s in data[shapes]]
            return Architecture(**{**data, "source": source})
        except (OSError, ValueError, TypeError, KeyError):
            pass  # not there yet, or unreadable: count again
    arch = _count_architecture(configs, source, family)
    if memo:
        try:
            from ..shared.fsio import atomic_write_json

            os.makedirs(os.path.dirname(memo), exist_ok=True)
            atomic_write_json(memo, asdict(arch), indent=None)
        except OSError:
            pass  # a read-only home: the plan still works, only slower
    return arch


def _memo_path(configs: dict, family: str) -> str | None:
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
    key = json.dumps([MEMO_SCHEMA, family, versions, configs], sort_keys=True, default=str)
    base = os.environ.get(ARCHITECTURE_MEMO_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fluxkit", "plan")
    return os.path.join(base, hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def _on_meta(cls, config: dict):
    """The module `cls` builds from `config`, on the meta device (diffusers' from_config or a
    transformers config object)."""
    import torch

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        if hasattr(cls, "from_config"):
            return cls.from_config(config)
        return cls(cls.config_class(**config))


def text_encoder_shape(config: dict) -> dict:
    """Width, feed-forward width, heads, layers and the longest input of a text encoder's config (a
    multimodal encoder's text part: text_config)."""
    config = config.get("text_config") or config
    out = {name: next((config[k] for k in keys if config.get(k) is not None), 0) for name, keys in _TEXT_KEYS.items()}
    out["max_tokens"] = config.get("max_position_embeddings")
    return out


def _count_architecture(configs: dict, source: str, family: str) -> Architecture:
    import torch

    from ..families import get

    fam = get(family)
    models = {name: _on_meta(fam.component_class(name), config) for name, config in configs.items()}
    linears = lambda m: [(n, mod.in_features, mod.out_features) for n, mod in m.named_modules()  # noqa: E731
                         if isinstance(mod, torch.nn.Linear)]
    vae = configs["vae"]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    params = {k: count(m) for k, m in models.items()}
    params["vae_encoder"] = count(models["vae"].encoder) + count(getattr(models["vae"], "quant_conv", None) or torch.nn.Identity())
    blocks = [count(b) for name in BLOCK_LISTS for b in getattr(models["transformer"], name)]
    texts = [{"component": name, "label": label, "role": role, "params": params[name],
              "keeps_hidden_states": fam.encoding_keeps_hidden_states, **text_encoder_shape(configs[name]),
              **quantization_facts(models[name])}
             for name, (label, role) in fam.text_encoder_labels.items()]
    trained = fam.trained_text_encoder
    return Architecture(source=source, params=params, block_params=blocks, family=family, text_encoders=texts,
                        transformer=dict(models["transformer"].config), vae_scale=2 ** (len(vae["block_out_channels"]) - 1),
                        latent_channels=vae["latent_channels"], vae_first_channels=vae["block_out_channels"][0],
                        vae_layers_per_block=vae.get("layers_per_block", 2), linear_shapes=linears(models["transformer"]),
                        trained_text_linear_shapes=linears(models[trained]) if trained else [])


def quantization_facts(model) -> dict:
    """What --text_encoder_quantization converts in a text encoder (fluxkit.weights.quant): the
    weights of those nn.Linear layers (quant_numel), their output rows (quant_rows), how many
    (quant_layers) and the largest of them (largest_linear); and the encoder's largest parameter (largest_param: what loading holds
    at once while it quantizes onto a device)."""
    from ..weights.quant import text_encoder_quantized_linears

    shapes = text_encoder_quantized_linears(model)
    return {"quant_numel": sum(i * o for i, o in shapes), "quant_rows": sum(o for _, o in shapes), "quant_layers": len(shapes),
            "largest_linear": max((i * o for i, o in shapes), default=0),
            "largest_param": max((p.numel() for p in model.parameters()), default=0)}


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


def quantized_text_bytes(t: dict, quantization: str, dtype_bytes: int) -> int:
    """Bytes of a text encoder (an Architecture.text_encoders entry) quantized by bitsandbytes as
    --text_encoder_quantization asks: its converted nn.Linear weights packed (nf4: two per byte, an
    fp32 absmax per 64 and a 16-value fp32 code table per layer; int8: one byte each and an fp32 scale
    per output row), the rest (embeddings, norms, the output head, biases) in the compute dtype."""
    numel, rows = t["quant_numel"], t["quant_rows"]
    packed = {"nf4": numel // 2 + math.ceil(numel / NF4_BLOCK) * 4 + t["quant_layers"] * NF4_CODE_BYTES,
              "int8": numel + rows * 4}.get(quantization)
    if packed is None:
        return t["params"] * dtype_bytes
    return packed + (t["params"] - numel) * dtype_bytes


def block_linear_shapes(shapes: list) -> list[list]:
    """The nn.Linear shapes of each transformer block, blocks in forward order (double-stream
    blocks, then single-stream ones): what --blocks_to_swap moves between host and device."""
    blocks: dict[tuple, list] = {}
    for name, i, o in shapes:
        m = re.match(r"(%s)\.(\d+)\." % "|".join(BLOCK_LISTS), name)
        if m:
            blocks.setdefault((BLOCK_LISTS.index(m.group(1)), int(m.group(2))), []).append((name, i, o))
    return [blocks[k] for k in sorted(blocks)]


def default_lora_targets(arch: Architecture | None = None) -> list[str]:
    """The LoRA targets diffusers' script for the architecture's family adapts (FLUX.1's without one)."""
    from types import SimpleNamespace

    from ..families import get

    if arch is None:
        return list(get("flux1").lora_targets)
    return get(arch.family).default_lora_targets(SimpleNamespace(**arch.transformer))
