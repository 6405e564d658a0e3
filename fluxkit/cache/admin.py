"""The cache's size and pruning.

Shards are immutable and are only ever added (by a rename) or removed (by an unlink), so pruning
is safe beside a running training run: a run maps the shards it indexed when it started (an
unlinked file's mapping stays valid until the run ends), and a shard removed before a run looks
is simply missing to it: its entries are encoded again. A partly used shard is rewritten: the
kept entries are committed as a new shard first, then the old one is removed. Least recently
used: every run stamps (mtime) the shards it reads, on its main process.
"""

from __future__ import annotations

import os

from .keys import text_key
from .store import ABOUT, LATENT_FIELDS, SHARD_PREFIX, SHARD_SUFFIX, TEXT_FIELDS, ShardStore, read_about


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
        rows.append({"namespace": ns, "shards": len(shards), "entries": entries, "bytes": size, "last_used": last,
                     "about": read_about(os.path.join(root, ns))})
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


def prune_unused(cache, prompts: list[str]) -> dict:
    """Keep only the entries this run uses (cache: its Cache): other models' namespaces go whole, this model's shards
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
                _remove(os.path.join(folder, ABOUT))
                os.rmdir(folder)
            except OSError:  # a run is writing into it right now: leave the folder
                pass
    ours = {cache.unreadable.key(h) for hashes in cache.image_hashes for h in hashes}
    folder = cache.unreadable.folder
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.endswith(".json") and name[:-5] not in ours:
            _remove(os.path.join(folder, name))
    return stats
