"""What names a cache entry: the encoders' identity (a namespace) and each entry's content key.

VAE_ID and TEXT_ID fingerprint the encoders (config, weight files' names, sizes, first and last MiB,
tokenizer files, the compute dtype), so a cache from another model is never read. Inside a
namespace an entry is keyed by content: image bytes hash + crop box + flip + bucket + resize filter
+ alpha background; prompt + max_sequence_length. Anything that changes gets a new key, so a stale
entry is never reused, and unchanged entries are.
"""

from __future__ import annotations

import os

import torch

from ..shared import fsio
from .store import content_digest, digest

FINGERPRINT_SAMPLE = 2**20


def _file_sample(path: str) -> bytes:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(FINGERPRINT_SAMPLE)
        f.seek(max(0, size - FINGERPRINT_SAMPLE))
        tail = f.read(FINGERPRINT_SAMPLE)
    return size.to_bytes(8, "little") + head + tail


def component_fingerprint(folder: str) -> str:
    """Identity of a pipeline component folder from its files: small files whole, weights sampled."""
    parts = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if os.path.getsize(path) <= 4 * FINGERPRINT_SAMPLE:
            with open(path, "rb") as f:
                parts += [name, f.read()]
        else:
            parts += [name, _file_sample(path)]
    return digest(*parts)


def vae_identity(model_dir: str, dtype: torch.dtype) -> str:
    return digest("vae", component_fingerprint(os.path.join(model_dir, "vae")), str(dtype))


def text_identity(model_dir: str, dtype: torch.dtype, family=None, settings: tuple = ()) -> str:
    """The text encoders' identity: their folders' contents (as the family names them), the dtype and
    the family's encoding settings (fluxkit.families: text_settings)."""
    from ..families import of_folder

    names = (family or of_folder(model_dir)).text_parts()
    return digest("text", *[component_fingerprint(os.path.join(model_dir, c)) for c in names], str(dtype), *settings)


def text_key(prompt: str, max_sequence_length: int) -> str:
    return digest("prompt", prompt, max_sequence_length)


class ImageHashes:
    """Content hash per image, remembered by (path, size, mtime) in CACHE/v1/image-hashes.json so a
    warm run does not read every image again. Table rows (parquet/hub) hash their bytes."""

    def __init__(self, root: str):
        import json

        self.path = os.path.join(root, "image-hashes.json")
        try:
            with open(self.path, encoding="utf-8") as f:
                self.known = json.load(f)
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def __call__(self, source) -> str:
        if isinstance(source, dict):
            source = source.get("bytes") or source.get("path")
        if isinstance(source, bytes):
            return content_digest(source)
        st = os.stat(source)
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        path = os.path.abspath(source)
        entry = self.known.get(path)
        if entry and entry[0] == stamp:
            return entry[1]
        value = content_digest(source)
        self.known[path] = [stamp, value]
        self.changed = True
        return value

    def save(self) -> None:
        if self.changed:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fsio.atomic_write_json(self.path, self.known, indent=None)
            self.changed = False


def image_hashes(dataset, hashes: ImageHashes) -> tuple[list[str], list[str]]:
    """Content hash of each instance image and each class image."""
    scan = dataset.scan
    return [hashes(scan.source(s)) for s in scan.samples], [hashes(scan.source(s)) for s in scan.class_samples]


def reference_hashes(dataset, hashes: ImageHashes) -> list[str]:
    """Content hash of each editing pair's reference image (none without pairs, fluxkit.data.pairs)."""
    scan = dataset.scan
    return [hashes(scan.reference_source(r)) for r in scan.references or ()]


def latent_keys(dataset, per_image: tuple[list[str], list[str]], images: dict[str, str] | None = None,
                references: list[str] | None = None) -> dict[int, str]:
    """Content key of every sample's latent: sample index i, -1 - i for its class partner and
    REFERENCE + i for its reference image (editing pairs). per_image: image_hashes(dataset, ...);
    references: reference_hashes(dataset, ...); images, when given, receives each key's image hash."""
    from ..data.pairs import REFERENCE

    image_hash, class_hash = per_image
    common = (dataset.interpolation, dataset.background)
    keys, images = {}, images if images is not None else {}
    for i in range(len(dataset)):
        keys[i] = digest("image", image_hash[i % len(image_hash)], dataset.placement(i).key(), *common)
        images[keys[i]] = image_hash[i % len(image_hash)]
        if class_hash:
            keys[-1 - i] = digest("image", class_hash[i % len(class_hash)], dataset.class_placement(i).key(), *common)
            images[keys[-1 - i]] = class_hash[i % len(class_hash)]
        if references:
            ref_hash = references[i % len(references)]
            keys[REFERENCE + i] = digest("image", ref_hash, dataset.reference_placement(i).key(), *common)
            images[keys[REFERENCE + i]] = ref_hash
    return keys


def training_prompts(dataset, args, family=None) -> list[str]:
    """Every prompt the run can encode: captions, the dropped caption, class and validation prompts
    (with the negative prompt the family's pipeline renders validation images with)."""
    prompts = {s.caption for s in dataset.scan.samples}
    if dataset.caption_dropout_rate > 0:
        prompts.add("")
    if dataset.class_prompt is not None:
        prompts.add(dataset.class_prompt)
    if args.validation_prompt:
        prompts.update(family.validation_prompts(args) if family is not None else [args.validation_prompt])
    return sorted(prompts)
