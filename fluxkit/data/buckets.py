"""Aspect-ratio buckets: train each image near its own shape instead of a square crop.

A bucket is a (width, height) with both sides multiples of 16 (an 8x VAE and FLUX's 2x2 packing)
and about resolution x resolution pixels (never more). Widths step by --bucket_step between
--min_bucket_side and --max_bucket_side; the square resolution x resolution is always a bucket.
Each image goes to the bucket whose aspect ratio is nearest its own (log scale), is resized to
cover it and cropped (center or random, as for square training).

Batches: every global batch (micro batch x processes) comes from one bucket, so all processes of a
step train the same shape (a DeepSpeed step never mixes shapes, and each process sees full batches).
A bucket's samples are shuffled per epoch and padded to whole global batches by cycling its own
samples (like DistributedSampler's padding); the global batches are then shuffled. The order is a
pure function of (seed, epoch), so skipping the first batches of an epoch on resume replays exactly
what an uninterrupted run would train.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..shared.errors import UserError

SIDE_MULTIPLE = 16


def default_side_limits(resolution: int) -> tuple[int, int]:
    """--min_bucket_side / --max_bucket_side when not given: half and twice the resolution."""
    low = max(SIDE_MULTIPLE, resolution // 2 // SIDE_MULTIPLE * SIDE_MULTIPLE)
    return low, resolution * 2


def make_buckets(resolution: int, step: int = 64, min_side: int | None = None, max_side: int | None = None) -> list[tuple[int, int]]:
    """All (width, height) buckets, sorted by aspect ratio (width / height). Impossible settings: UserError."""
    low, high = default_side_limits(resolution)
    min_side = low if min_side is None else min_side
    max_side = high if max_side is None else max_side
    if step <= 0 or step % SIDE_MULTIPLE:
        raise UserError(f"--bucket_step {step} must be a positive multiple of {SIDE_MULTIPLE}")
    for flag, side in (("--min_bucket_side", min_side), ("--max_bucket_side", max_side)):
        if side <= 0 or side % SIDE_MULTIPLE:
            raise UserError(f"{flag} {side} must be a positive multiple of {SIDE_MULTIPLE}")
    if not min_side <= resolution <= max_side:
        raise UserError(f"--resolution {resolution} must lie between --min_bucket_side {min_side} and "
                        f"--max_bucket_side {max_side}; widen the side limits")
    area = resolution * resolution
    found = {(resolution, resolution)}
    first = math.ceil(min_side / step) * step
    for w in range(first, max_side + 1, step):
        h = area // w // step * step
        if min_side <= h <= max_side:
            found.add((w, h))
            found.add((h, w))
    return sorted(found, key=lambda b: (b[0] / b[1], b[0]))


def assign(sizes, buckets: list[tuple[int, int]]) -> np.ndarray:
    """Index of the bucket whose aspect ratio is nearest each (width, height), in log scale; on a tie
    the larger bucket."""
    ratios = np.log(np.array([w / h for w, h in buckets]))
    areas = np.array([w * h for w, h in buckets])
    out = np.empty(len(sizes), dtype=np.int32)
    for i, (w, h) in enumerate(sizes):
        dist = np.abs(ratios - math.log(w / h))
        best = np.flatnonzero(dist <= dist.min() + 1e-12)
        out[i] = best[np.argmax(areas[best])]
    return out


class BucketSampler(torch.utils.data.Sampler):
    """Sample indices in an order where each run of batch_size x world_size consecutive indices is one
    bucket's. Plugged in as the DataLoader's sampler with batch_size = micro batch, accelerate's
    sharding hands batch k to process k % world_size, so each global batch is one shape.

    bucket_of_image[j] is image j's bucket; sample i shows image i % images. Yields epoch * length + i
    (see fluxkit.data.dataset) and needs no state besides the epoch.
    """

    def __init__(self, bucket_of_image: np.ndarray, length: int, batch_size: int, world_size: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0
        self.group = batch_size * world_size
        self.bucket_of_image = np.asarray(bucket_of_image)
        counts = np.bincount(self._buckets(np.arange(length)))
        self._length = int(sum(math.ceil(c / self.group) * self.group for c in counts if c))

    def _buckets(self, indices: np.ndarray) -> np.ndarray:
        return self.bucket_of_image[indices % len(self.bucket_of_image)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[np.ndarray]:
        """This epoch's global batches (each one bucket), in training order."""
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.length, generator=g).numpy()
        buckets = self._buckets(order)
        batches = []
        for b in np.unique(buckets):
            members = order[buckets == b]  # keeps the shuffled order
            padded = np.resize(members, math.ceil(len(members) / self.group) * self.group)  # cycles
            batches.extend(padded.reshape(-1, self.group))
        shuffle = torch.randperm(len(batches), generator=g).tolist()
        return [batches[k] for k in shuffle]

    def __iter__(self):
        offset = self.epoch * self.length
        for batch in self.global_batches():
            yield from (int(i) + offset for i in batch)

    def __len__(self) -> int:
        return self._length


def add_flags(g) -> None:
    """--aspect_ratio_buckets and the buckets' sizes."""
    g.add_argument("--aspect_ratio_buckets", action="store_true",
                   help="(ours) train each image in the bucket nearest its aspect ratio (about resolution^2 pixels) instead of a square crop")
    g.add_argument("--bucket_step", type=int, default=64, help="(ours) bucket sides step by this many pixels (a multiple of 16)")
    g.add_argument("--min_bucket_side", type=int, default=None, help="(ours) shortest bucket side (default: half the resolution)")
    g.add_argument("--max_bucket_side", type=int, default=None, help="(ours) longest bucket side (default: twice the resolution)")


def validate(args) -> None:
    if args.aspect_ratio_buckets:
        make_buckets(args.resolution, args.bucket_step, args.min_bucket_side, args.max_bucket_side)
