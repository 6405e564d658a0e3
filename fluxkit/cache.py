"""The persistent latent / text-embedding cache: encode each image and caption once, ever.

Layout (--latent_cache_dir, default OUTPUT_DIR's parent/.fluxkit-cache; a flag of its own because
diffusers' --cache_dir already names the hub download cache):

    CACHE/v1/latents/VAE_ID/shard-HASH.safetensors     VAE latent moments (mean, logvar) per image variant
    CACHE/v1/text/TEXT_ID/shard-HASH.safetensors       T5 sequence + CLIP pooled embeddings per prompt
    CACHE/v1/unreadable/KEY.json                       an image whose header scanned but whose pixels do
                                                       not decode (keyed by its bytes and Pillow's version)

VAE_ID and TEXT_ID fingerprint the encoders (config, weight files' names, sizes, first and last MiB,
tokenizer files, the compute dtype), so a cache from another model is never read (it is rebuilt,
with one line saying so). Inside a namespace an entry is keyed by content: image bytes hash + crop
box + flip + bucket + resize filter + alpha background; prompt + max_sequence_length. Anything
that changes gets a new key, so a stale entry is never reused, and unchanged entries are.

Shards are written whole (temporary file + rename) and named by the hash of their bytes. Reading
checks the hash: a corrupt or truncated shard is reported, deleted and its entries re-encoded.
A crash mid-fill loses at most the entries not yet in a finished shard. Tensors are read through
safetensors' memory map.

Filling: every process encodes its share (entries sorted by key, dealt round-robin), then all
wait; entries still missing after that (processes on machines that do not share the folder) are
encoded locally, with a line saying the cache folder is not shared.

Each image is encoded alone (batch of 1), cached or not: on CPU (and with some GPU kernels) a
VAE's output depends slightly on which other images share the batch, and a cached latent must be a
pure function of its key. With that, cached and uncached runs give identical losses.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time

import torch

from . import fsio
from .errors import UserError

logger = logging.getLogger("fluxkit.cache")
FORMAT = "v1"
SHARD_PREFIX, SHARD_SUFFIX = "shard-", ".safetensors"
SHARD_TARGET_BYTES = 64 * 2**20   # a shard is written when its entries reach this size,
SHARD_MAX_SECONDS = 60.0          # or when its first pending entry is this old (a crash loses at most that)
FINGERPRINT_SAMPLE = 2**20
LATENT_FIELDS = ("mean", "logvar")
TEXT_FIELDS = ("seq", "pooled")


def default_cache_dir(output_dir: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(output_dir)), ".fluxkit-cache")


def digest(*parts) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        data = p if isinstance(p, bytes) else str(p).encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


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


def content_digest(path_or_bytes) -> str:
    """Hash of a file's bytes (or of bytes): the same value either way."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(path_or_bytes, bytes):
        h.update(path_or_bytes)
        return h.hexdigest()
    with open(path_or_bytes, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ shards

class ShardStore:
    """A folder of immutable safetensors shards, each named by the hash of its bytes."""

    def __init__(self, folder: str, fields: tuple[str, ...]):
        self.folder, self.fields = folder, fields
        self.index: dict[str, str] = {}     # entry key -> shard path
        self.seen: set[str] = set()         # shard names already verified (or found corrupt)
        self.handles: dict[str, object] = {}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.pending_since = None
        self.corrupt: list[str] = []

    def refresh(self) -> None:
        """Index shards written since the last refresh (by any process); drop corrupt ones."""
        from safetensors import safe_open

        if not os.path.isdir(self.folder):
            return
        for name in sorted(os.listdir(self.folder)):
            if not (name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX)) or name in self.seen:
                continue
            self.seen.add(name)
            path = os.path.join(self.folder, name)
            try:
                problem = None if content_digest(path) == name[len(SHARD_PREFIX):-len(SHARD_SUFFIX)] else "its bytes do not match its hash"
                if problem is None:
                    handle = safe_open(path, framework="pt")
                    keys = {k.rsplit(".", 1)[0] for k in handle.keys()}
            except FileNotFoundError:  # another process found it corrupt and removed it
                continue
            except Exception as err:  # safetensors rejects a damaged header in several ways
                problem = f"{type(err).__name__}: {str(err)[:120]}"
            if problem:
                self.corrupt.append(name)
                logger.warning("cache shard %s is corrupt (%s): discarded, its entries will be encoded again", path, problem)
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
                continue
            self.handles[path] = handle
            for k in keys:
                self.index.setdefault(k, path)

    def __contains__(self, key: str) -> bool:
        return key in self.index or f"{key}.{self.fields[0]}" in self.pending

    def get(self, key: str) -> tuple[torch.Tensor, ...]:
        if key in self.index:
            handle = self.handles[self.index[key]]
            return tuple(handle.get_tensor(f"{key}.{f}") for f in self.fields)
        return tuple(self.pending[f"{key}.{f}"] for f in self.fields)

    def add(self, key: str, tensors: tuple[torch.Tensor, ...]) -> None:
        for f, t in zip(self.fields, tensors):
            t = t.detach().to("cpu").contiguous()
            self.pending[f"{key}.{f}"] = t
            self.pending_bytes += t.numel() * t.element_size()
        self.pending_since = self.pending_since or time.monotonic()
        if self.pending_bytes >= SHARD_TARGET_BYTES or time.monotonic() - self.pending_since >= SHARD_MAX_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write pending entries as one shard: temporary file, hash, rename to its hashed name."""
        from safetensors.torch import save

        if not self.pending:
            return
        os.makedirs(self.folder, exist_ok=True)
        data = save(self.pending, metadata={"fluxkit_cache": FORMAT})
        name = f"{SHARD_PREFIX}{content_digest(data)}{SHARD_SUFFIX}"
        path = os.path.join(self.folder, name)
        fsio.atomic_write_bytes(path, data)
        self.pending, self.pending_bytes, self.pending_since = {}, 0, None
        self.seen.discard(name)
        self.refresh()


# ------------------------------------------------------------------------------------ keys

def vae_identity(model_dir: str, dtype: torch.dtype) -> str:
    return digest("vae", component_fingerprint(os.path.join(model_dir, "vae")), str(dtype))


def text_identity(model_dir: str, dtype: torch.dtype) -> str:
    parts = [component_fingerprint(os.path.join(model_dir, c)) for c in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")]
    return digest("text", *parts, str(dtype))


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


def latent_keys(dataset, per_image: tuple[list[str], list[str]], images: dict[str, str] | None = None) -> dict[int, str]:
    """Content key of every sample's latent: sample index i, and -1 - i for its class partner.
    per_image: image_hashes(dataset, ...); images, when given, receives each key's image hash."""
    image_hash, class_hash = per_image
    common = (dataset.interpolation, dataset.background)
    keys, images = {}, images if images is not None else {}
    for i in range(len(dataset)):
        keys[i] = digest("image", image_hash[i % len(image_hash)], dataset.placement(i).key(), *common)
        images[keys[i]] = image_hash[i % len(image_hash)]
        if class_hash:
            keys[-1 - i] = digest("image", class_hash[i % len(class_hash)], dataset.class_placement(i).key(), *common)
            images[keys[-1 - i]] = class_hash[i % len(class_hash)]
    return keys


class UnreadableImages:
    """Images whose pixel data did not decode (their header passed the scan), shared by every
    process and run like the shards: one small JSON file per image, keyed by its bytes' hash and
    Pillow's version (another decoder may read it). With it, a rerun knows before loading any model:
    it stops in one line, or (--skip_bad_images) replaces those samples without encoders."""

    def __init__(self, root: str):
        self.folder = os.path.join(root, "unreadable")
        self.known: dict[str, dict] = {}

    @staticmethod
    def key(image_hash: str) -> str:
        import PIL

        return digest("unreadable", image_hash, PIL.__version__)

    def refresh(self) -> None:
        import json

        if not os.path.isdir(self.folder):
            return
        for name in os.listdir(self.folder):
            if name.endswith(".json") and name[:-5] not in self.known:
                try:
                    with open(os.path.join(self.folder, name), encoding="utf-8") as f:
                        self.known[name[:-5]] = json.load(f)
                except (OSError, ValueError):  # removed meanwhile, or not ours: the image is simply tried again
                    continue

    def reason(self, image_hash: str) -> str | None:
        entry = self.known.get(self.key(image_hash))
        return entry.get("reason") if isinstance(entry, dict) else None

    def add(self, image_hash: str, name: str, reason: str) -> None:
        key = self.key(image_hash)
        self.known[key] = {"name": name, "reason": reason}
        os.makedirs(self.folder, exist_ok=True)
        fsio.atomic_write_json(os.path.join(self.folder, key + ".json"), self.known[key])


def training_prompts(dataset, args) -> list[str]:
    """Every prompt the run can encode: captions, the dropped caption, class and validation prompts."""
    prompts = {s.caption for s in dataset.scan.samples}
    if dataset.caption_dropout_rate > 0:
        prompts.add("")
    if dataset.class_prompt is not None:
        prompts.add(dataset.class_prompt)
    if getattr(args, "validation_prompt", None):
        prompts.add(args.validation_prompt)
    return sorted(prompts)


# ------------------------------------------------------------------------------------ the cache

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
        self.image_hashes: tuple[list[str], list[str]] = ([], [])  # per instance image, per class image
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

    def unreadable_images(self) -> tuple[dict[int, str], dict[int, str]]:
        """({instance image index: reason}, {class image index: reason}) of images that do not decode."""
        if not self.enabled:
            return {}, {}
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


class _PixelsOf(torch.utils.data.Dataset):
    """Decode the images of a fill share in DataLoader workers."""

    def __init__(self, dataset, items: list[tuple[str, int]]):
        self.dataset, self.items = dataset, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        """(key, pixels, None), or (key, None, (name, reason)) for an image that does not decode: the
        fill decides in its own process (a worker's exception would arrive as a wrapped traceback)."""
        from .data import UnreadableImage

        key, index = self.items[i]
        d = self.dataset
        try:
            if index >= 0:
                return key, d.pixels(d.instance_of(index), d.placement(index)), None
            partner = -1 - index
            return key, d.pixels(d.class_of(partner), d.class_placement(partner)), None
        except UnreadableImage as err:
            return key, None, (err.name, err.reason)


def fill(cache: Cache, dataset, prompts: list[str], encode_image, encode_text, rank: int = 0, world: int = 1,
         barrier=None, num_workers: int = 0, show: bool = True) -> dict:
    """Encode what the cache lacks: this process's share, then (after `barrier`, i.e. once every
    process has committed its shards) whatever is still missing here. Returns counts and seconds."""
    started = time.perf_counter()
    for attempt in ("share", "local"):
        latents, texts = cache.missing_latents(), cache.missing_prompts(prompts)
        if attempt == "share":
            latents, texts = latents[rank::world], texts[rank::world]
            if barrier is not None:
                # every process has taken its share of the same missing list before anyone writes a
                # shard: a process that looked later would see a shorter list, and its shares would
                # no longer partition the work (some entries nobody's, others twice)
                barrier()
        elif latents or texts:
            logger.warning("cache folder %s is not shared with every process (%d latents and %d prompts encoded "
                           "elsewhere are not visible here): this machine encodes them itself",
                           cache.root, len(latents), len(texts))
        # every process reaches every barrier, with or without work of its own: one that skipped a
        # barrier would leave the others waiting for it forever
        _fill_share(cache, dataset, latents, texts, encode_image, encode_text, num_workers, show)
        if barrier is not None:
            barrier()
        cache.refresh()
    return {"seconds": time.perf_counter() - started, **cache.encoded}


def _fill_share(cache, dataset, latents, texts, encode_image, encode_text, num_workers, show) -> None:
    from tqdm.auto import tqdm

    total = len(latents) + len(texts)
    bar = tqdm(total=total, desc="caching latents and text", unit="entry", disable=not show or total == 0, file=sys.stderr)
    try:
        for prompt in texts:
            cache.text.add(text_key(prompt, cache.max_sequence_length), _one(encode_text, [prompt]))
            cache.encoded["text"] += 1
            bar.update(1)
        cache.text.flush()
        if latents:
            # its own generator: starting an iterator must not draw from the global RNG (training's noise)
            loader = torch.utils.data.DataLoader(_PixelsOf(dataset, latents), batch_size=None, num_workers=num_workers,
                                                 generator=torch.Generator().manual_seed(0))
            try:
                for key, pixels, failure in loader:
                    bar.update(1)
                    if failure is not None:
                        _record_unreadable(cache, dataset, key, *failure)
                        continue
                    cache.latents.add(key, _one(encode_image, pixels.unsqueeze(0)))
                    cache.encoded["latents"] += 1
            finally:  # also when a damaged image stops the run: what was encoded is kept
                cache.latents.flush()
    finally:
        bar.close()


def _record_unreadable(cache: Cache, dataset, key: str, name: str, reason: str) -> None:
    """An image that does not decode: recorded for every process and later runs, then one error line,
    or with --skip_bad_images named once (its samples are replaced in training, fluxkit.data)."""
    from .data import UnreadableImage, say_skipped, skipped_name

    cache.unreadable.add(cache.key_images[key], name, reason)
    if not dataset.skip_bad:
        raise UnreadableImage(name, reason)
    say_skipped(skipped_name(name, reason))


# ------------------------------------------------------------------------------------ for the trainer

def cache_root(args) -> str | None:
    """The cache folder of a run, or None with --no_cache."""
    if getattr(args, "no_cache", False):
        return None
    return os.path.abspath(os.path.expanduser(getattr(args, "latent_cache_dir", None) or default_cache_dir(args.output_dir)))


def check_cache_dir(args, given_only: bool = False) -> str | None:
    """Fail in one line (exit 2) before any model loads when the cache folder cannot take files.
    given_only: check only a --latent_cache_dir the user gave (the default one sits beside the
    output folder, whose own check names the right flag when that place is unusable)."""
    root = cache_root(args)
    if root is not None and not (given_only and not getattr(args, "latent_cache_dir", None)):
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
    keys = latent_keys(dataset, per_image, key_images)
    from .environment import is_rank0

    if is_rank0():
        hashes.save()
    cache = Cache(root, vae_identity(model_dir, weight_dtype), text_identity(model_dir, weight_dtype),
                  args.max_sequence_length, keys, device, key_images)
    cache.image_hashes = per_image
    _say_if_other_models(cache)
    _check_known_unreadable(cache, dataset)
    if is_rank0():
        mark_used(cache, training_prompts(dataset, args))
    return cache


def _check_known_unreadable(cache: Cache, dataset) -> None:
    """Images an earlier fill could not decode: one error line now, before any model loads, or with
    --skip_bad_images name them (once, on the main process)."""
    from .data import UnreadableImage, say_skipped, skipped_name
    from .environment import is_rank0

    unreadable, unreadable_class = cache.unreadable_images()
    found = [(dataset.scan.samples[i].name, r) for i, r in unreadable.items()]
    found += [(dataset.scan.class_samples[i].name, r) for i, r in unreadable_class.items()]
    if found and not dataset.skip_bad:
        name, reason = found[0]
        raise UnreadableImage(name, f"{reason}; recorded by an earlier run in {cache.unreadable.folder}")
    for name, reason in found if is_rank0() else ():
        say_skipped(skipped_name(name, reason))


def _say_if_other_models(cache: Cache) -> None:
    """One line when the folder only holds entries of other encoders (another model, or another dtype)."""
    for store, what in ((cache.latents, "VAE"), (cache.text, "text encoders")):
        parent = os.path.dirname(store.folder)
        others = [n for n in os.listdir(parent) if n != os.path.basename(store.folder)] if os.path.isdir(parent) else []
        if others and not store.index:
            logger.info("latent cache %s holds entries of %d other %s (another model or dtype): this model's are built anew",
                        parent, len(others), what)


# ------------------------------------------------------------------------------------ size and pruning
#
# Shards are immutable and are only ever added (by a rename) or removed (by an unlink), so pruning
# is safe beside a running training run: a run maps the shards it indexed when it started (an
# unlinked file's mapping stays valid until the run ends), and a shard removed before a run looks
# is simply missing to it: its entries are encoded again. A partly used shard is rewritten: the
# kept entries are committed as a new shard first, then the old one is removed. Least recently
# used: every run stamps (mtime) the shards it reads, on its main process.

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


def _namespaces(root: str) -> list[str]:
    """'latents/VAE_ID' and 'text/TEXT_ID' folders under CACHE/v1."""
    found = []
    for kind in ("latents", "text"):
        folder = os.path.join(root, kind)
        if os.path.isdir(folder):
            found += [f"{kind}/{n}" for n in sorted(os.listdir(folder)) if os.path.isdir(os.path.join(folder, n))]
    return found


def _shard_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.startswith(SHARD_PREFIX) and n.endswith(SHARD_SUFFIX)]


def _shard_entries(path: str) -> set[str] | None:
    """Entry keys in a shard's header (not verified), or None when it cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k.rsplit(".", 1)[0] for k in f.keys()}
    except Exception:  # gone, or damaged: a run will find and rebuild it
        return None


def _remove(path: str) -> int:
    """Unlink one file; its size, or 0 when another process removed it first."""
    try:
        size = os.path.getsize(path)
        os.remove(path)
        return size
    except FileNotFoundError:
        return 0


def usage(root: str) -> list[dict]:
    """One row per namespace: shards, entries, bytes, last used (newest shard stamp)."""
    rows = []
    for ns in _namespaces(root):
        shards = _shard_files(os.path.join(root, ns))
        entries, size, last = 0, 0, 0.0
        for path in shards:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            size, last = size + st.st_size, max(last, st.st_mtime)
            entries += len(_shard_entries(path) or ())
        rows.append({"namespace": ns, "shards": len(shards), "entries": entries, "bytes": size, "last_used": last})
    markers = os.path.join(root, "unreadable")
    rows.append({"namespace": "unreadable", "shards": 0, "entries": len(os.listdir(markers)) if os.path.isdir(markers) else 0,
                 "bytes": 0, "last_used": 0.0})
    return rows


def prune_to_size(root: str, max_bytes: int) -> dict:
    """Remove the least recently used shards (any model) until the cache holds at most max_bytes."""
    shards = []
    for ns in _namespaces(root):
        for path in _shard_files(os.path.join(root, ns)):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            shards.append((st.st_mtime, path, st.st_size))
    total, removed, freed = sum(s[2] for s in shards), 0, 0
    for _, path, size in sorted(shards):
        if total <= max_bytes:
            break
        freed += _remove(path)
        total -= size
        removed += 1
    return {"removed_shards": removed, "removed_bytes": freed, "kept_bytes": total}


def prune_unused(cache: Cache, prompts: list[str]) -> dict:
    """Keep only the entries this run uses: other models' namespaces go whole, this model's shards
    lose the entries of other data (rewritten when partly used), records of other images go."""
    from safetensors import safe_open

    keep_of = {cache.latents.folder: set(cache.latent_keys.values()),
               cache.text.folder: {text_key(p, cache.max_sequence_length) for p in prompts}}
    stats = {"removed_shards": 0, "rewritten_shards": 0, "removed_bytes": 0, "removed_entries": 0, "kept_bytes": 0}
    for ns in _namespaces(cache.root):
        folder = os.path.join(cache.root, ns)
        keep = keep_of.get(folder, set())
        for path in _shard_files(folder):
            entries = _shard_entries(path)
            if entries is None:
                continue  # damaged or gone: the next run that reads this namespace rebuilds it
            kept = entries & keep
            if kept == entries:
                stats["kept_bytes"] += os.path.getsize(path)
                continue
            if kept:  # commit the kept entries as a shard of their own before removing the old one
                store = ShardStore(folder, LATENT_FIELDS if ns.startswith("latents/") else TEXT_FIELDS)
                with safe_open(path, framework="pt") as f:
                    for key in sorted(kept):
                        store.add(key, tuple(f.get_tensor(f"{key}.{field}") for field in store.fields))
                    store.flush()
                stats["rewritten_shards"] += 1
                stats["kept_bytes"] += sum(os.path.getsize(p) for p in set(store.index.values()) if os.path.exists(p))
            stats["removed_bytes"] += _remove(path)
            stats["removed_shards"] += 1
            stats["removed_entries"] += len(entries - kept)
        if not _shard_files(folder) and folder not in keep_of:
            try:
                os.rmdir(folder)
            except OSError:  # a run is writing into it right now: leave the folder
                pass
    ours = {cache.unreadable.key(h) for hashes in cache.image_hashes for h in hashes}
    folder = cache.unreadable.folder
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.endswith(".json") and name[:-5] not in ours:
            _remove(os.path.join(folder, name))
    return stats


# ------------------------------------------------------------------------------------ python -m fluxkit.cache

def main(argv=None) -> int:
    """Fill the cache a training run will read, ahead of it, with a progress bar and an ETA; or show
    its size and prune it.

    python -m fluxkit.cache [--full] TRAINER FLAGS            fill what the run needs
    python -m fluxkit.cache --prune [--full] TRAINER FLAGS    remove every entry that run does not use
    python -m fluxkit.cache --list (--latent_cache_dir DIR | --output_dir OUT)
    python -m fluxkit.cache --max_size_gb N (--latent_cache_dir DIR | --output_dir OUT)

    Give the same flags as the training command (data, --resolution, crops, --seed, buckets,
    --max_sequence_length, --mixed_precision, --output_dir or --latent_cache_dir). --full takes the
    full fine-tune's defaults (--max_sequence_length 77) instead of the LoRA script's (512).
    --max_size_gb removes the least recently used shards (of any model) until the cache is that big.
    Pruning is safe while runs use the cache: what a run still needs is encoded again, never corrupted.
    """
    from .errors import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--list" in argv or any(a == "--max_size_gb" or a.startswith("--max_size_gb=") for a in argv):
        return cli(_size_command)(argv)
    if "-h" in argv or "--help" in argv:  # the modes first; the trainer's flags follow
        import inspect

        print(inspect.cleandoc(main.__doc__) + "\n\nTRAINER FLAGS:", flush=True)
    return cli(_fill_command)(argv)


def _size_command(argv) -> int:
    import argparse
    import datetime
    import json

    p = argparse.ArgumentParser(prog="python -m fluxkit.cache", description="show the latent cache's size, or shrink it")
    p.add_argument("--list", action="store_true", help="one line per model namespace: shards, entries, size, last used")
    p.add_argument("--max_size_gb", type=float, default=None, help="remove least recently used shards down to this size")
    p.add_argument("--latent_cache_dir", default=None, help="the cache folder (as given to the trainer)")
    p.add_argument("--output_dir", default=None, help="or the run's output folder (the default cache is beside it)")
    args = p.parse_args(argv)
    if not (args.latent_cache_dir or args.output_dir):
        raise UserError("give --latent_cache_dir DIR (or the run's --output_dir) to name the cache")
    if args.max_size_gb is not None and args.max_size_gb < 0:
        raise UserError(f"--max_size_gb {args.max_size_gb} must be 0 or more")
    top = cache_root(argparse.Namespace(no_cache=False, latent_cache_dir=args.latent_cache_dir, output_dir=args.output_dir or "."))
    root = os.path.join(top, FORMAT)
    if not os.path.isdir(root):
        raise UserError(f"{top!r} holds no fluxkit cache ({FORMAT}/ is missing); check --latent_cache_dir")
    if args.max_size_gb is not None:
        stats = prune_to_size(root, int(args.max_size_gb * 2**30))
        print(json.dumps({"cache_dir": root, **stats}), flush=True)
    if args.list:
        rows = usage(root)
        print(f"{root}: {sum(r['bytes'] for r in rows) / 2**20:.1f} MiB in {sum(r['shards'] for r in rows)} shard(s)")
        for r in rows:
            when = datetime.datetime.fromtimestamp(r["last_used"]).strftime("%Y-%m-%d %H:%M") if r["last_used"] else "-"
            what = "image(s) that do not decode" if r["namespace"] == "unreadable" else f"entries in {r['shards']} shard(s)"
            print(f"  {r['namespace']:<42} {r['entries']:>8} {what:<28} {r['bytes'] / 2**20:>10.1f} MiB  last used {when}")
    return 0


def _fill_command(argv=None) -> int:
    import json

    from .data import DreamBoothDataset
    from .scan import list_images
    from .device import check_mixed_precision, detect, torch_dtype
    from .encode import encode_prompts, latent_moments
    from .models import load_models, resolve_model_dir
    from .scan import add_class_images, scan_dataset
    from .train_args import parse_args

    argv = list(sys.argv[1:] if argv is None else argv)
    lora, prune = "--full" not in argv, "--prune" in argv
    args = parse_args([a for a in argv if a not in ("--full", "--prune")], lora=lora)
    if prune:  # pruning trains nothing: images recorded as undecodable are kept out, not an error
        args.skip_bad_images = True
    if args.no_cache:
        raise UserError("--no_cache leaves nothing to fill; drop it")
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    info = detect(args.device)
    model_dir = resolve_model_dir(args)
    scan = scan_dataset(args, world_size=1)
    check_cache_dir(args)
    if args.with_prior_preservation and os.path.isdir(args.class_data_dir or ""):
        add_class_images(scan, list_images(args.class_data_dir, "--class_data_dir")[: args.num_class_images], args)
    check_mixed_precision(info, args.mixed_precision)
    # the trainer's compute dtype: encoders run in it, and it is part of the cache's identity
    dtype = torch_dtype(args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))
    device = torch.device(info.type)
    dataset = DreamBoothDataset(args, seed=args.seed or 0, scan=scan)
    cache = build(args, dataset, model_dir, dtype, device)
    prompts = training_prompts(dataset, args)
    if prune:
        print(json.dumps({"cache_dir": cache.root, **prune_unused(cache, prompts)}), flush=True)
        return 0
    if cache.missing_latents() or cache.missing_prompts(prompts):
        m = load_models(args, model_dir, without=("transformer", "scheduler"))
        for module in (m.vae, m.text_encoder, m.text_encoder_2):
            module.requires_grad_(False)
            module.to(device, dtype=dtype)
        from .data import default_num_workers

        workers = args.dataloader_num_workers or default_num_workers(1)  # decoding in parallel is the point here
        fill(cache, dataset, prompts, lambda px: latent_moments(m.vae, px),
             lambda batch: encode_prompts(batch, m, args.max_sequence_length, device), num_workers=workers)
    print(json.dumps({"cache_dir": cache.root, "latents_encoded": cache.encoded["latents"], "prompts_encoded": cache.encoded["text"],
                      "latents": len(set(cache.latent_keys.values())), "prompts": len(prompts)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
