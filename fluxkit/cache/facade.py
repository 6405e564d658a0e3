"""The Cache the training run reads (latent moments by sample index, text embeddings by prompt),
the run's cache built from its data (build), and the data preparation the trainer and
`python -m fluxkit.cache` share (prepare_data).
"""

from __future__ import annotations

import logging
import os

import torch

from ..shared import fsio
from .keys import (ImageHashes, image_hashes, latent_keys, reference_hashes, text_identity, text_key, training_prompts,
                   vae_identity)
from .store import FORMAT, LATENT_FIELDS, TEXT_FIELDS, ShardStore, UnreadableImages, write_about

logger = logging.getLogger("fluxkit.cache")


def default_cache_dir(output_dir: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(output_dir)), ".fluxkit-cache")


def _one(encode, batch):
    """encode() on a batch of one, under no_grad: ((B, ...) pair) -> (...) pair."""
    with torch.no_grad():
        a, b = encode(batch)
    return a[0], b[0]


class Cache:
    """What the loss asks for: latent moments by sample index, text embeddings by prompt.

    Persistent when `root` is given (see the module notes); without it (--no_cache) everything is
    encoded every time, the same way (one image or prompt at a time), so both give the same numbers.
    Keys are sample indices (class partners negative) and prompts, never step numbers, so a shuffled
    loader can never pair a caption with another image's latents. Callers pass the encoders as
    functions: encode(pixels (B, 3, H, W)) -> (mean, logvar); encode(prompts) -> (sequence, pooled).
    """

    def __init__(self, root: str | None, vae_id: str = "", text_id: str = "", max_sequence_length: int = 77,
                 latent_keys: dict[int, str] | None = None, device="cpu", key_images: dict[str, str] | None = None):
        self.root = os.path.join(root, FORMAT) if root else None
        self.device = device
        self.max_sequence_length = max_sequence_length
        self.latent_keys = latent_keys or {}
        self.key_images = key_images or {}  # latent key -> its image's content hash
        # content hash per instance image, per class image, per reference image (editing pairs)
        self.image_hashes: tuple[list[str], list[str], list[str]] = ([], [], [])
        self.latents = ShardStore(os.path.join(self.root, "latents", vae_id), LATENT_FIELDS) if root else None
        self.text = ShardStore(os.path.join(self.root, "text", text_id), TEXT_FIELDS) if root else None
        self.unreadable = UnreadableImages(self.root) if root else None
        self.encoded = {"latents": 0, "text": 0}
        if root:
            self.refresh()

    def refresh(self) -> None:
        """See what other processes have committed since."""
        self.latents.refresh()
        self.text.refresh()
        self.unreadable.refresh()

    def undecodable(self, key: str) -> bool:
        return key in self.key_images and self.unreadable.reason(self.key_images[key]) is not None

    def unreadable_images(self) -> tuple[dict[int, str], dict[int, str], dict[int, str]]:
        """({instance image index: reason}, {class image index: reason}, {reference image index: reason})
        of images that do not decode (a reference's index is its pair's instance image index)."""
        if not self.enabled:
            return {}, {}, {}
        return tuple({i: self.unreadable.reason(h) for i, h in enumerate(hashes) if self.unreadable.reason(h)}
                     for hashes in self.image_hashes)

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def missing_latents(self) -> list[tuple[str, int]]:
        """(key, sample index) of each distinct latent not in the cache, in key order."""
        if not self.enabled:
            return []
        first = {}
        for index, key in self.latent_keys.items():
            if key not in self.latents and key not in first and not self.undecodable(key):
                first[key] = index
        return sorted(first.items())

    def missing_prompts(self, prompts: list[str]) -> list[str]:
        if not self.enabled:
            return sorted(set(prompts))
        return sorted(p for p in set(prompts) if text_key(p, self.max_sequence_length) not in self.text)

    def latent_moments(self, keys: list[int], pixels, encode) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) for each sample index; encode(pixels of one sample) for what is not cached."""
        pairs = []
        for j, index in enumerate(keys):
            key = self.latent_keys.get(index) if self.enabled else None
            if key is not None and key in self.latents:
                pairs.append(self.latents.get(key))
                continue
            if pixels is None:
                raise RuntimeError(f"the latent of sample {index} is not cached and the batch has no pixels")
            pair = _one(encode, pixels[j:j + 1])
            self.encoded["latents"] += 1
            if key is not None:
                self.latents.add(key, pair)
            pairs.append(pair)
        return self._stack(pairs)

    def text_embeddings(self, prompts: list[str], encode) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence, pooled) per prompt; encode([prompt]) for what is not cached."""
        pairs = []
        for prompt in prompts:
            key = text_key(prompt, self.max_sequence_length) if self.enabled else None
            if key is not None and key in self.text:
                pairs.append(self.text.get(key))
                continue
            pair = _one(encode, [prompt])
            self.encoded["text"] += 1
            if key is not None:
                self.text.add(key, pair)
            pairs.append(pair)
        return self._stack(pairs)

    def _stack(self, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.stack([p[0].to(self.device) for p in pairs]), torch.stack([p[1].to(self.device) for p in pairs]))

    def flush(self) -> None:
        if self.enabled:
            self.latents.flush()
            self.text.flush()


def cache_folder(latent_cache_dir: str | None, output_dir: str | None) -> str:
    """--latent_cache_dir, else the default folder beside --output_dir."""
    return os.path.abspath(os.path.expanduser(latent_cache_dir or default_cache_dir(output_dir)))


def cache_root(args) -> str | None:
    """The cache folder of a run (its TrainConfig), or None with --no_cache."""
    if args.no_cache:
        return None
    return cache_folder(args.latent_cache_dir, args.output_dir)


def check_cache_dir(args, given_only: bool = False) -> str | None:
    """Fail in one line (exit 2) before any model loads when the cache folder cannot take files.
    given_only: check only a --latent_cache_dir the user gave (the default one sits beside the
    output folder, whose own check names the right flag when that place is unusable)."""
    root = cache_root(args)
    if root is not None and not (given_only and not args.latent_cache_dir):
        fsio.ensure_writable_dir(root, "--latent_cache_dir")
    return root


def build(args, dataset, model_dir: str, weight_dtype: torch.dtype, device="cpu") -> Cache:
    """The run's cache: every sample's latent key (hashing images not seen before) and the encoders' identity."""
    root = cache_root(args)
    if root is None:
        return Cache(None, max_sequence_length=args.max_sequence_length, device=device)
    hashes = ImageHashes(os.path.join(root, FORMAT))
    per_image = image_hashes(dataset, hashes)  # reads (or hashes) each image once
    key_images = {}
    references = reference_hashes(dataset, hashes)
    keys = latent_keys(dataset, per_image, key_images, references)
    from ..shared.environment import is_rank0

    if is_rank0():
        hashes.save()
    from ..families import of_args

    family = of_args(args, model_dir)
    text_id = text_identity(model_dir, weight_dtype, family, family.text_settings(args))
    cache = Cache(root, vae_identity(model_dir, weight_dtype), text_id, args.max_sequence_length, keys, device, key_images)
    cache.image_hashes = (*per_image, references)
    _say_if_other_models(cache)
    _check_known_unreadable(cache, dataset)
    if is_rank0():
        mark_used(cache, training_prompts(dataset, args, family))
        precision = str(weight_dtype).replace("torch.", "")
        write_about(cache.latents.folder, f"VAE latents of {os.path.abspath(model_dir)} ({precision})")
        encoders = [p for p in family.text_parts() if not p.startswith("tokenizer")]
        # no sequence length in the name: it is part of each entry's key, so one folder holds every length's
        write_about(cache.text.folder, f"{' + '.join(encoders)} embeddings of {os.path.abspath(model_dir)} ({precision})")
    return cache


def _check_known_unreadable(cache: Cache, dataset) -> None:
    """Images an earlier fill could not decode: one error line now, before any model loads, or with
    --skip_bad_images name them (once, on the main process)."""
    from ..data.dataset import UnreadableImage, say_skipped, skipped_name
    from ..shared.environment import is_rank0

    unreadable, unreadable_class, unreadable_reference = cache.unreadable_images()
    found = [(dataset.scan.samples[i].name, r) for i, r in unreadable.items()]
    found += [(dataset.scan.class_samples[i].name, r) for i, r in unreadable_class.items()]
    found += [(dataset.scan.references[i].name, r) for i, r in unreadable_reference.items()]
    if found and not dataset.skip_bad:
        name, reason = found[0]
        raise UnreadableImage(name, f"{reason}; recorded by an earlier run in {cache.unreadable.folder}")
    for name, reason in found if is_rank0() else ():
        say_skipped(skipped_name(name, reason))


def _say_if_other_models(cache: Cache) -> None:
    """One line when the folder only holds entries of other encoders (another model, or another dtype)."""
    for store, what in ((cache.latents, "VAE"), (cache.text, "text-encoder")):
        parent = os.path.dirname(store.folder)
        others = [n for n in os.listdir(parent) if n != os.path.basename(store.folder)] if os.path.isdir(parent) else []
        if others and not store.index:
            logger.info("latent cache %s holds %s entries of other models or dtypes only (%d set(s)): this model's are "
                        "built anew", parent, what, len(others))


def mark_used(cache: Cache, prompts: list[str]) -> None:
    """Stamp the shards this run reads as used now (--max_size_gb removes the least recently used)."""
    wanted = ((cache.latents, set(cache.latent_keys.values())),
              (cache.text, {text_key(p, cache.max_sequence_length) for p in prompts}))
    for store, keys in wanted:
        for path in {store.index[k] for k in keys if k in store.index}:
            try:
                os.utime(path)
            except OSError:  # removed meanwhile, or a read-only shared cache: the stamp is a courtesy
                pass


def prepare_data(args, scan, class_images, model_dir: str, weight_dtype: torch.dtype, device="cpu"):
    """(dataset, its cache, the prompts it encodes) from the data scan (fluxkit.data.scan) and prior
    preservation's class images (their paths; None without them). The trainer and
    `python -m fluxkit.cache` both start here, so the cache a fill command writes is the one the run reads."""
    from ..data.dataset import DreamBoothDataset
    from ..data.scan import add_class_images

    if class_images:
        add_class_images(scan, class_images, args)
    dataset = DreamBoothDataset(args, seed=args.seed or 0, scan=scan)
    cache = build(args, dataset, model_dir, weight_dtype, device)
    from ..families import of_args

    return dataset, cache, training_prompts(dataset, args, of_args(args, model_dir))


def add_flags(g) -> None:
    """Where the cache lives, or none at all."""
    g.add_argument("--latent_cache_dir", default=None,
                   help="(ours) persistent VAE latent / text embedding cache (default: OUTPUT_DIR's parent/.fluxkit-cache); "
                        "--cache_dir stays diffusers' download cache")
    g.add_argument("--no_cache", action="store_true", help="(ours) never cache latents or text embeddings (for comparisons)")
