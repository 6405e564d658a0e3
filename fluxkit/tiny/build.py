"""Build a random FLUX pipeline of a chosen family and size, and sample training data, fully offline.

A FLUX.1 folder has the same layout and component classes as black-forest-labs/FLUX.1-dev
(scheduler, vae, text_encoder + tokenizer (CLIP), text_encoder_2 + tokenizer_2 (T5),
transformer); a Kontext folder is the same components saved as FluxKontextPipeline; FLUX.2
[dev] and [klein] folders come from fluxkit.tiny.flux2. Every script in the toolkit runs on them unchanged.
Tokenizers are trained here from a small in-memory corpus: no hub access is ever needed.
"""

from __future__ import annotations

import io
import os
import random
import shutil
from dataclasses import dataclass, field

from ..shared import fsio
from ..shared.errors import UserError
from .common import SCHEDULER_CONFIG, _corpus, _vae  # noqa: F401 (SCHEDULER_CONFIG: bench suites read it here)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    transformer: dict
    vae: dict
    clip: dict
    t5: dict
    clip_vocab: int = 1000
    t5_vocab: int = 1000
    large: bool = False
    sample_resolution: int = 64  # image size of the sample data written with --dataset_dir
    extra: dict = field(default_factory=dict)

    def configs(self) -> dict:
        """{pipeline folder: config} of the components (what the memory plan counts)."""
        return {"transformer": self.transformer, "vae": self.vae, "text_encoder": self.clip, "text_encoder_2": self.t5}




def _clip(hidden, layers, heads, intermediate, vocab, projection):
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=77, vocab_size=vocab,
                projection_dim=projection, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _t5(d_model, layers, heads, d_kv, d_ff, vocab, gated=True):
    return dict(d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers, num_decoder_layers=layers,
                num_heads=heads, vocab_size=vocab, feed_forward_proj="gated-gelu" if gated else "relu",
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                is_encoder_decoder=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                dense_act_fn="gelu_new" if gated else "relu", is_gated_act=gated, tie_word_embeddings=False)


def _transformer(in_channels, layers, single_layers, head_dim, heads, joint_dim, pooled_dim, axes):
    assert sum(axes) == head_dim, "FLUX needs sum(axes_dims_rope) == attention_head_dim"
    return dict(patch_size=1, in_channels=in_channels, out_channels=None, num_layers=layers,
                num_single_layers=single_layers, attention_head_dim=head_dim, num_attention_heads=heads,
                joint_attention_dim=joint_dim, pooled_projection_dim=pooled_dim, guidance_embeds=True,
                axes_dims_rope=list(axes))


# in_channels of the transformer is 4x the VAE's latent channels: FLUX packs 2x2 latent patches.
PRESETS = {
    "tiny": Preset(
        name="tiny", description="for tests: seconds to build, a few MB; VAE downsamples 2x, 4 latent channels",
        transformer=_transformer(16, 1, 1, 16, 2, 32, 32, (4, 6, 6)),
        vae=_vae((8, 16), latent_channels=4, groups=8),
        clip=_clip(32, 2, 2, 37, 1000, 32), t5=_t5(32, 2, 4, 8, 37, 1000),
        sample_resolution=32,
    ),
    "small": Preset(
        name="small", description="for CPU benchmarks: VAE downsamples 8x with 16 latent channels like FLUX's; 2 double + 4 single blocks",
        transformer=_transformer(64, 2, 4, 64, 4, 256, 128, (16, 24, 24)),
        vae=_vae((32, 64, 64, 64), latent_channels=16, groups=32),
        clip=_clip(128, 2, 4, 256, 1000, 128), t5=_t5(256, 2, 4, 64, 512, 1000),
        sample_resolution=256,
    ),
    # FLUX.1-dev at 1/140 scale with its proportions: T5 40% of the transformer's parameters (dev:
    # 4.76B / 11.9B), CLIP 1.0% (123M), the VAE 0.7% (84M; 8x down, 16 latent channels). For
    # measuring what the encoders cost in memory on a CPU: a 2-step LoRA run takes seconds.
    "devlike": Preset(
        name="devlike", description="FLUX.1-dev's proportions at 1/140 scale (84M transformer; T5, CLIP and VAE 0.40, 0.010 and 0.007 of it): CPU memory benchmarks",
        transformer=_transformer(64, 3, 6, 64, 10, 512, 128, (16, 24, 24)),
        vae=_vae((16, 32, 48, 48), latent_channels=16, groups=8),
        clip=_clip(128, 4, 4, 448, 1000, 128), t5=_t5(512, 11, 8, 64, 1280, 1000),
        sample_resolution=256,
    ),
    "dev": Preset(
        name="dev", description="FLUX.1-dev's exact architecture with random weights (about 12B transformer + 4.7B T5): GPU benchmarks only",
        transformer=_transformer(64, 19, 38, 128, 24, 4096, 768, (16, 56, 56)),
        vae=_vae((128, 256, 512, 512), latent_channels=16, groups=32, layers_per_block=2),
        clip=_clip(768, 12, 12, 3072, 49408, 768), t5=_t5(4096, 24, 64, 64, 10240, 32128),
        clip_vocab=49408, t5_vocab=32128, large=True, sample_resolution=512,
    ),
}



def build_clip_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE tokenizer with CLIP's special tokens, trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import CLIPTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 1000), special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    return CLIPTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=77)


def build_t5_tokenizer(vocab_size: int = 1000):
    """A Unigram tokenizer with T5's special tokens (pad=0, eos=1, unk=2), trained offline."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=min(vocab_size, 1000), special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


FAMILIES = ("flux1", "kontext", "flux2", "flux2-klein")  # what build_pipeline builds


def parameter_count(preset) -> dict:
    """Parameter counts per component, computed on the meta device (nothing materialised)."""
    import torch

    with torch.device("meta"):
        comps = _builder(preset)(preset)
    return {name: sum(p.numel() for p in m.parameters()) for name, m in comps.items()}


def _builder(preset):
    from . import flux2 as tiny_flux2

    return tiny_flux2.build_models if isinstance(preset, tiny_flux2.Flux2Preset) else build_models


def build_models(preset: Preset) -> dict:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    return {
        "transformer": FluxTransformer2DModel(**preset.transformer),
        "vae": AutoencoderKL(**preset.vae),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**preset.clip)),
        "text_encoder_2": T5EncoderModel(T5Config(**preset.t5)),
    }


def check_output_dir(path: str, overwrite: bool, what: str) -> None:
    """Refuse a destination that is a file, holds something (unless overwrite) or cannot be created."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path!r} exists and is not a directory; choose another path")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise UserError(f"{what} {path!r} exists and is not empty; pass --overwrite to replace it or choose another path")
    parent = os.path.dirname(os.path.abspath(path)) or "."
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{what} {path!r} cannot be created: {probe!r} is a file, not a directory; choose another path")
    if not os.access(probe, os.W_OK):
        raise UserError(f"{what} {path!r} is not writable (no write permission on {probe!r}); choose another path")


def build_pipeline(output_dir: str, preset: str | Preset = "tiny", seed: int = 0, overwrite: bool = False,
                   allow_large: bool = False, dtype: str = "fp32", progress: bool = False, family: str = "flux1") -> str:
    """Write a random pipeline folder of `family` (one of FAMILIES) at output_dir and return its path."""
    import torch

    from ..shared.device import torch_dtype as device_dtype

    p = resolve_preset(preset, family)
    if p.large and not allow_large:
        counts = parameter_count(p)
        total = sum(counts.values())
        text = counts.get("text_encoder_2", counts["text_encoder"])
        raise UserError(
            f"--preset {p.name} builds {total / 1e9:.1f}B random parameters "
            f"(transformer {counts['transformer'] / 1e9:.1f}B, text encoder {text / 1e9:.1f}B), "
            f"about {total * 2 / 2**30:.0f} GiB in bf16; pass --allow_large if this machine has the memory and disk for it")
    check_output_dir(output_dir, overwrite, "--output_dir")
    torch_dtype = device_dtype(dtype)

    staging = fsio.staging_dir(output_dir)
    try:
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype if torch_dtype != torch.float16 else torch.float32)
        try:
            models = _builder(p)(p)
        finally:
            torch.set_default_dtype(previous)
        if torch_dtype == torch.float16:  # built in fp32 (fp16 init is unstable), stored in fp16
            models = {k: m.to(torch_dtype) for k, m in models.items()}
        pipe = _pipeline(family, p, models)
        pipe.save_pretrained(staging, safe_serialization=True, max_shard_size="5GB")
        fsio.atomic_write_json(os.path.join(staging, "fluxkit_preset.json"),
                               {"preset": p.name, "seed": seed, "dtype": dtype, "family": family})
        fsio.publish_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _pipeline(family: str, p, models: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .. import families
    from . import flux2 as tiny_flux2

    if isinstance(p, tiny_flux2.Flux2Preset):
        return tiny_flux2.pipeline(p, models)
    return families.get(family).pipeline_class()(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        tokenizer=build_clip_tokenizer(p.clip_vocab), tokenizer_2=build_t5_tokenizer(p.t5_vocab), **models)


def presets_of(family: str) -> dict:
    """The presets `family` can be built at (FLUX.1 and Kontext share theirs)."""
    from .flux2 import PRESETS_BY_FAMILY

    if family not in FAMILIES:
        raise UserError(f"--family {family!r} cannot be built here; choose one of {', '.join(FAMILIES)}")
    return PRESETS_BY_FAMILY.get(family, PRESETS)


def resolve_preset(preset, family: str = "flux1"):
    if not isinstance(preset, str):
        return preset
    presets = presets_of(family)
    if preset not in presets:
        raise UserError(f"unknown --preset {preset!r} for --family {family}; choose one of {', '.join(presets)}")
    return presets[preset]


# ---------------------------------------------------------------- sample data

SUBJECT_PROMPT = "a photo of sks dog"
_COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "purple": (150, 50, 190), "orange": (240, 140, 30)}
_SHAPES = ("circle", "square", "stripes")


def pattern_image(size: int, color: tuple, shape: str, rnd: random.Random):
    """An image with a learnable structure (a coloured shape on a soft gradient), not noise."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size))
    px = img.load()
    base = rnd.randint(180, 240)
    for y in range(size):
        v = base - (y * 60) // size
        for x in range(size):
            px[x, y] = (v, v, min(255, v + 10))
    draw = ImageDraw.Draw(img)
    r = size // 4 + rnd.randint(-size // 16, size // 16)
    cx = size // 2 + rnd.randint(-size // 8, size // 8)
    cy = size // 2 + rnd.randint(-size // 8, size // 8)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        step = max(2, size // 8)
        for x0 in range(0, size, step * 2):
            draw.rectangle([x0, 0, x0 + step - 1, size], fill=color)
    return img


def build_datasets(dataset_dir: str, seed: int = 0, resolution: int = 64, num_instance: int = 4,
                   num_captioned: int = 8, overwrite: bool = False) -> dict:
    """Write sample data under dataset_dir and return the paths:

    instance/            images of one subject ("a photo of sks dog": a red circle) for DreamBooth
    captioned/data/train-00000-of-00001.parquet   pokemon-blip-captions layout: image {bytes, path}, text
    prompts.txt          prompts for inference
    edit/targets/ + edit/references/   editing pairs (same file names; NAME.txt the instruction) for
                         Kontext and FLUX.2: --instance_data_dir edit/targets --cond_image_dir edit/references
    edit/data/train-00000-of-00001.parquet   the same pairs as columns image, cond_image, text
    """
    import datasets

    check_output_dir(dataset_dir, overwrite, "--dataset_dir")
    rnd = random.Random(seed)
    staging = fsio.staging_dir(dataset_dir)
    try:
        inst = os.path.join(staging, "instance")
        os.makedirs(inst)
        for i in range(num_instance):
            pattern_image(resolution, _COLORS["red"], "circle", rnd).save(os.path.join(inst, f"sks_{i:03d}.png"))

        images, texts = [], []
        for i in range(num_captioned):
            color = rnd.choice(sorted(_COLORS))
            shape = rnd.choice(_SHAPES)
            img = pattern_image(resolution, _COLORS[color], shape, rnd)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            images.append({"bytes": buf.getvalue(), "path": f"{i:04d}.png"})
            texts.append(f"a {color} {shape} on a gray background")
        features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
        data_dir = os.path.join(staging, "captioned", "data")
        os.makedirs(data_dir)
        datasets.Dataset.from_dict({"image": images, "text": texts}, features=features).to_parquet(
            os.path.join(data_dir, "train-00000-of-00001.parquet"))

        _write_editing_pairs(os.path.join(staging, "edit"), resolution, rnd, num_instance)

        with open(os.path.join(staging, "prompts.txt"), "w") as f:
            f.write("# one prompt per line; blank lines and comments are skipped\n")
            f.write(f"{SUBJECT_PROMPT}\n{SUBJECT_PROMPT} on a beach\n\na blue square on a gray background\n")
        fsio.publish_dir(staging, dataset_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "instance_dir": os.path.join(dataset_dir, "instance"),
        "dataset_name": os.path.join(dataset_dir, "captioned"),
        "prompts_file": os.path.join(dataset_dir, "prompts.txt"),
        "edit_targets": os.path.join(dataset_dir, "edit", "targets"),
        "edit_references": os.path.join(dataset_dir, "edit", "references"),
        "edit_dataset": os.path.join(dataset_dir, "edit"),
    }


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write_editing_pairs(folder: str, resolution: int, rnd: random.Random, count: int) -> None:
    """Pairs whose instruction recolours the shape: the reference has it red, the target in the named colour."""
    import datasets

    targets, references = os.path.join(folder, "targets"), os.path.join(folder, "references")
    os.makedirs(targets)
    os.makedirs(references)
    rows = {"image": [], "cond_image": [], "text": []}
    for i in range(count):
        color, shape = rnd.choice(sorted(set(_COLORS) - {"red"})), rnd.choice(_SHAPES)
        state = rnd.getstate()
        reference = pattern_image(resolution, _COLORS["red"], shape, rnd)
        rnd.setstate(state)  # the same placement of the shape in both images
        target = pattern_image(resolution, _COLORS[color], shape, rnd)
        name, text = f"pair_{i:03d}", f"make the {shape} {color}"
        reference.save(os.path.join(references, name + ".png"))
        target.save(os.path.join(targets, name + ".png"))
        with open(os.path.join(targets, name + ".txt"), "w") as f:
            f.write(text + "\n")
        rows["image"].append({"bytes": _png(target), "path": name + ".png"})
        rows["cond_image"].append({"bytes": _png(reference), "path": name + ".png"})
        rows["text"].append(text)
    features = datasets.Features({"image": datasets.Image(), "cond_image": datasets.Image(), "text": datasets.Value("string")})
    os.makedirs(os.path.join(folder, "data"))
    datasets.Dataset.from_dict(rows, features=features).to_parquet(os.path.join(folder, "data", "train-00000-of-00001.parquet"))
