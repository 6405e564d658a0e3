"""Filling the cache ahead of training: every process encodes its share (entries sorted by key,
dealt round-robin), then all wait; entries still missing after that (processes on machines that do
not share the folder) are encoded locally, with a line saying the cache folder is not shared.
"""

from __future__ import annotations

import logging
import sys
import time

import torch

from .facade import Cache, _one
from .keys import text_key

logger = logging.getLogger("fluxkit.cache")


class _PixelsOf(torch.utils.data.Dataset):
    """Decode the images of a fill share in DataLoader workers."""

    def __init__(self, dataset, items: list[tuple[str, int]]):
        self.dataset, self.items = dataset, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        """(key, pixels, None), or (key, None, (name, reason)) for an image that does not decode: the
        fill decides in its own process (a worker's exception would arrive as a wrapped traceback)."""
        from ..data.dataset import UnreadableImage

        key, index = self.items[i]
        try:
            return key, self.dataset.pixels_at(index), None
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
    or with --skip_bad_images named once (its samples are replaced in training, fluxkit.data.dataset)."""
    from ..data.dataset import UnreadableImage, say_skipped, skipped_name

    cache.unreadable.add(cache.key_images[key], name, reason)
    if not dataset.skip_bad:
        raise UnreadableImage(name, reason)
    say_skipped(skipped_name(name, reason))
