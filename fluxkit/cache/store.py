"""Where cache entries live: a folder of immutable safetensors shards, each named by the hash of
its bytes (ShardStore), and the record of images that do not decode (UnreadableImages).

Shards are written whole (temporary file + rename) and named by the hash of their bytes. Reading
checks the hash: a corrupt or truncated shard is reported, deleted and its entries re-encoded.
A crash mid-fill loses at most the entries not yet in a finished shard. Tensors are read through
safetensors' memory map.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

import torch

from ..shared import fsio

logger = logging.getLogger("fluxkit.cache")
FORMAT = "v1"
SHARD_PREFIX, SHARD_SUFFIX = "shard-", ".safetensors"
SHARD_TARGET_BYTES = 64 * 2**20   # a shard is written when its entries reach this size,
SHARD_MAX_SECONDS = 60.0          # or when its first pending entry is this old (a crash loses at most that)
ABOUT = "about.json"  # in each namespace folder: what wrote it, in words (python -m fluxkit.cache --list)
LATENT_FIELDS = ("mean", "logvar")
TEXT_FIELDS = ("seq", "pooled")


def digest(*parts) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        data = p if isinstance(p, bytes) else str(p).encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


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


def write_about(folder: str, what: str) -> None:
    """Name a namespace folder (its name is a hash of the encoders) once, for people reading --list."""
    path = os.path.join(folder, ABOUT)
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        fsio.atomic_write_json(path, {"what": what})


def read_about(folder: str) -> str:
    import json

    try:
        with open(os.path.join(folder, ABOUT), encoding="utf-8") as f:
            return str(json.load(f).get("what", ""))
    except (OSError, ValueError, AttributeError):
        return ""
