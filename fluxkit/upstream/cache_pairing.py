"""Caches that diffusers' example scripts read by step number, read by the batch's samples instead.

Kontext's LoRA script (and FLUX.1's LoRA scripts, and FLUX.2's img2img ones) fill their caches
(prompt embeddings, VAE latents, reference latents) in a pass over the training loader and read
them back as `cache[step]` in every epoch. But the loader orders its batches anew on each pass (a
bucket sampler reshuffling, or shuffle=True), and under several processes each rank trains only its
share of the batches: `cache[step]` then belongs to another batch, and a caption meets another
image's latents. The source fix `cache-by-sample` (script_fixes) makes the script iterate its loader
through `keyed_batches`, which knows the dataset indices of each batch, file every cache entry under
them (`cache_append`) and read the entry of the batch it trains (`cached`).

FLUXKIT_CACHE_PAIRING_LOG=FILE makes every read append one JSON line to FILE: the rank, the step, the
cache, the batch's indices, the entry read, and `by_step`, the indices of the batch whose entry the
unmodified script would have read.
"""

from __future__ import annotations

import collections
import json
import os

from ..shared.errors import UserError

ENV_LOG = "FLUXKIT_CACHE_PAIRING_LOG"
FIX = "cache-by-sample"  # the source fix that calls these helpers
_current: list = [None]  # the dataset indices of the batch the script holds now
_filed: dict[int, "_Filed"] = {}  # id(cache list) -> its keys
_recording_classes: dict[type, type] = {}


def _recording_iter(self):
    """A loader's batch sampler's __iter__, remembering per pass the index lists it yielded and nobody took yet."""
    self._fluxkit_pending = pending = collections.deque()
    for indices in super(type(self), self).__iter__():
        pending.append(tuple(int(i) for i in indices))
        yield indices


def _record(sampler) -> None:
    cls = type(sampler)
    if not getattr(cls, "_fluxkit_recording", False):
        if cls not in _recording_classes:
            _recording_classes[cls] = type(f"Recording{cls.__name__}", (cls,), {"__iter__": _recording_iter,
                                                                               "_fluxkit_recording": True})
        sampler.__class__ = _recording_classes[cls]  # a subclass: isinstance() holds for accelerate and the script


def keyed_batches(loader) -> "_KeyedBatches":
    """The loader's batches (its len too), each made known to cache_append and cached by its dataset indices."""
    return _KeyedBatches(loader)


class _KeyedBatches:
    """What keyed_batches returns.

    A DataLoader asks its batch sampler for index lists in the order it delivers the batches, even ahead
    of them (workers, accelerate's look-ahead), so the oldest index list not yet taken is this batch's.
    """

    def __init__(self, loader):
        self.loader = loader
        self.sampler = getattr(loader, "batch_sampler", None)
        if self.sampler is None:
            raise UserError(f"the training loader ({type(loader).__name__}) has no batch sampler, so fix {FIX!r} cannot "
                            f"tell which samples a batch holds; rerun patch_flux.py with --skip {FIX}")
        _record(self.sampler)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            _current[0] = self.sampler._fluxkit_pending.popleft()
            yield batch


class _Filed:
    """A cache list's keys: the dataset indices of the batch each entry was made from."""

    def __init__(self, cache):
        self.cache, self.keys, self._index = cache, [], None

    def index(self):
        """(key -> entry, sample -> (entry, slot in its batch)), rebuilt when entries were added."""
        if self._index is None or self._index[0] != len(self.keys):
            by_key = {k: i for i, k in enumerate(self.keys)}
            by_sample = {s: (i, j) for i, k in enumerate(self.keys) for j, s in enumerate(k)}
            self._index = (len(self.keys), by_key, by_sample)
        return self._index[1:]


def cache_append(cache: list, entry) -> None:
    """cache.append(entry), filed under the dataset indices of the batch being cached."""
    cache.append(entry)
    filed = _filed.setdefault(id(cache), _Filed(cache))
    filed.keys.append(_current[0])


def cached(cache: list, step: int, name: str):
    """The entry of cache made from the batch being trained (cache[step] read it by position)."""
    filed = _filed.get(id(cache))
    if filed is None or filed.cache is not cache:
        raise UserError(f"{name} is read before anything was cached in it (fix {FIX!r}); rerun patch_flux.py with --skip {FIX}")
    key, (by_key, by_sample) = _current[0], filed.index()
    if key in by_key:
        entry, where = cache[by_key[key]], by_key[key]
    else:  # the batch was never cached as a whole (a shuffled loader regroups samples each pass)
        missing = [s for s in key if s not in by_sample]
        if missing:
            raise UserError(f"sample {missing[0]} of the batch at step {step} is in no entry of {name} (fix {FIX!r}); "
                            f"rerun patch_flux.py with --skip {FIX}")
        where = [by_sample[s] for s in key]
        entry = _gather([(cache[i], j, len(filed.keys[i])) for i, j in where])
    _log(name, step, key, where, filed.keys[step] if step < len(filed.keys) else None)
    return entry


def _gather(parts):
    """One batch's entry from slot j of entries made from batches of b samples: parts = [(entry, j, b)].

    A batch's tensors hold its samples' rows in groups (instance rows, then class rows with prior
    preservation): slot j of a batch of b samples with n rows is rows j, j + b, ... A tensor whose length
    is no multiple of b is the same for every batch and is taken from the first entry; FLUX's text_ids
    (zeros, one row per token) may be regrouped either way.
    """
    import torch

    first, _, b0 = parts[0]
    if isinstance(first, (tuple, list)):
        return type(first)(_gather([(e[i], j, b) for e, j, b in parts]) for i in range(len(first)))
    if hasattr(first, "parameters") and isinstance(first.parameters, torch.Tensor):  # diffusers' latent distribution
        params = _gather([(e.parameters, j, b) for e, j, b in parts])
        return type(first)(params, deterministic=getattr(first, "deterministic", False))
    if not isinstance(first, torch.Tensor):
        raise UserError(f"fix {FIX!r} cannot regroup a cache entry of type {type(first).__name__}; "
                        f"rerun patch_flux.py with --skip {FIX}")
    if first.dim() == 0 or first.shape[0] % b0:
        return first
    groups = first.shape[0] // b0
    return torch.cat([e[g * b + j: g * b + j + 1] for g in range(groups) for e, j, b in parts])


def _log(name, step, key, where, by_step) -> None:
    path = os.environ.get(ENV_LOG)
    if not path:
        return
    line = {"rank": int(os.environ.get("RANK", "0") or 0), "step": step, "cache": name, "batch": list(key),
            "entry": where, "by_step": list(by_step) if by_step is not None else None}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
