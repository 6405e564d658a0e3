"""Training data, streamed: images are decoded and transformed when a batch needs them.

The dataset object holds only what the up-front scan found (fluxkit.data.scan): where each image is,
its size and its caption. Pixels are made in __getitem__, inside DataLoader workers, so host memory
does not grow with the dataset or with --repeats (a repeat is index arithmetic: sample i shows image
i % images).

Randomness is a pure function of the seed and the sample index, never of the worker, the process
or the order samples are drawn in:
- the crop and flip of sample i come from (seed, i) and are the same in every epoch. A cached
  latent is therefore exact, cached and uncached runs give the same losses, and the cache holds one
  entry per sample (repeats of an image with --center_crop and no flip share one). Different
  repeats of an image get different crops: use --repeats for more crop variants.
- caption dropout of sample i in epoch e comes from (seed, i, e): a different subset each epoch.
  The sampler passes the epoch inside the index (epoch * len + i) so that workers never need it.
No torchvision: PIL and numpy.

An image whose header passed the scan can still fail to decode (a PNG whose chunks and CRCs are
intact but whose compressed pixel data is damaged). A worker never raises for that: the item
carries the one-line error, and `checked_batches` raises it in the training process as a
UserError (one `error:` line, exit 2), however many workers there are. With --skip_bad_images the
sample is replaced by another sample of the same bucket, drawn from (seed, epoch, index) until one
decodes; a decode failure is a property of the file, so the replacement is the same in every
run, worker count and resume. The skipped file is named once (per process).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import itertools
import logging

import numpy as np
import torch

from ..shared.errors import UserError
from ..shared.host_runtime import usable_cpus
from .pairs import REFERENCE
from .scan import scan_dataset

INTERPOLATION_MODES = ("lanczos", "bilinear", "bicubic", "nearest", "box", "hamming")
logger = logging.getLogger("fluxkit.data.dataset")
SUBSTITUTE_DRAWS = 16  # random draws for a replacement sample before walking the bucket in order
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _resample(mode: str):
    from PIL import Image

    table = {"lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
             "nearest": Image.NEAREST, "box": Image.BOX, "hamming": Image.HAMMING}
    if mode.lower() not in table:
        raise UserError(f"--image_interpolation_mode {mode!r} is not one of {', '.join(INTERPOLATION_MODES)}")
    return table[mode.lower()]


def parse_color(value: str, flag: str = "--alpha_background") -> tuple[int, int, int]:
    """'white', 'black', '#808080', 'rgb(1,2,3)' ... -> (r, g, b)."""
    from PIL import ImageColor

    try:
        rgb = ImageColor.getrgb(value)
    except (ValueError, AttributeError):
        raise UserError(f"{flag} {value!r} is not a colour; use a name like white or black, or #rrggbb") from None
    return tuple(rgb[:3])


# ------------------------------------------------------------------------------------ decoding

def to_rgb(image, background: tuple[int, int, int] = (255, 255, 255)):
    """Any image PIL opens -> an 8-bit RGB image, upright.

    EXIF orientation is applied. 16-bit grey (I;16*) and 32-bit integer grey (I, which PIL also uses
    for 16-bit data) are scaled from 0..65535, float grey (F) from 0..1: PIL's own conversion clips
    them at 255 (a 16-bit photo turns almost white). Transparent images (RGBA, LA, PA, P with a
    transparency key) are composited on `background`. CMYK, YCbCr, P, L, 1 convert as PIL does.
    """
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        arr = np.asarray(image).astype(np.float64)
        scale = 255.0 if mode == "F" else 255.0 / 65535.0
        grey = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


class UnreadableImage(UserError):
    """An image that cannot be decoded (name: what messages call it, reason: the decoder's error)."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"cannot decode image {name!r} ({reason}); its header looked fine but its pixel data is "
                         "damaged: remove or repair the file, or pass --skip_bad_images to train on without it")


def skipped_name(name: str, reason: str) -> str:
    return f"{name} ({reason})"


def say_skipped(name_and_reason: str) -> None:
    logger.warning("skipped undecodable image %s (--skip_bad_images): its samples are replaced by other samples "
                   "of the same shape", name_and_reason)


def open_image(source, name: str):
    """Decode a file path, raw bytes or an {bytes, path} dict (datasets' undecoded Image) fully."""
    import io

    from PIL import Image

    try:
        if isinstance(source, dict):
            source = source.get("bytes") or source.get("path")
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        img.load()
        return img
    except Exception as err:  # PIL raises many types for bad files
        raise UnreadableImage(name, f"{type(err).__name__}: {str(err)[:160]}") from None


# ------------------------------------------------------------------------------------ transforms

@dataclass(frozen=True)
class Placement:
    """How one sample's image becomes its training pixels: resize to (resize_w, resize_h), crop the
    (width x height) box at (left, top), maybe flip. A pure function of the image size, the target
    size, the flags and the sample's seed, so it is known (and part of the cache key) before decoding."""
    width: int
    height: int
    resize_w: int
    resize_h: int
    left: int
    top: int
    flip: bool

    def key(self) -> str:
        return f"{self.resize_w}x{self.resize_h}+{self.left}+{self.top}:{self.width}x{self.height}:{int(self.flip)}"


def sample_rng(seed: int, index: int, purpose: str = "crop") -> random.Random:
    """A generator for one sample: string seeds hash with SHA-512, so this never depends on the
    process, the worker or PYTHONHASHSEED."""
    return random.Random(f"fluxkit:{purpose}:{seed}:{index}")


def place(size: tuple[int, int], target: tuple[int, int], center_crop: bool, random_flip: bool,
          rng: random.Random) -> Placement:
    """Resize so the image covers target (keeping its aspect ratio), then crop target out of it."""
    w, h = size
    tw, th = target
    scale = max(tw / w, th / h)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    if center_crop:
        left, top = (rw - tw) // 2, (rh - th) // 2
    else:
        left, top = rng.randint(0, rw - tw), rng.randint(0, rh - th)
    flip = bool(random_flip and rng.random() < 0.5)
    return Placement(tw, th, rw, rh, left, top, flip)


def apply_placement(image, p: Placement, interpolation: str) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    from PIL import Image

    image = image.resize((p.resize_w, p.resize_h), resample=_resample(interpolation))
    image = image.crop((p.left, p.top, p.left + p.width, p.top + p.height))
    if p.flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# ------------------------------------------------------------------------------------ the dataset

class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance samples (and class partners for prior preservation) from a DatasetScan, streamed.

    len = max(images x repeats, class images). Item i (or epoch * len + i, see the module notes) is a
    dict: index (the sample shown: i, or its replacement), pixel_values, prompt, and
    class_pixel_values/class_prompt with prior preservation (class images cycle; a partner takes
    its instance sample's shape); `skipped` names images replaced in this item, `unreadable` is the
    error of an item that could not be made.
    """

    def __init__(self, args, class_images: list[str] | None = None, seed: int = 0, scan=None):
        self.scan = scan if scan is not None else scan_dataset(args, world_size=1, class_images=class_images, quiet=True)
        self.seed = seed
        self.center_crop, self.random_flip = bool(args.center_crop), bool(args.random_flip)
        self.interpolation = args.image_interpolation_mode
        _resample(self.interpolation)
        self.background = parse_color(args.alpha_background or "white")
        self.caption_dropout_rate = float(args.caption_dropout_rate or 0.0)
        self.resolution = args.resolution
        self.class_prompt = args.class_prompt if self.scan.class_samples else None
        self.skip_bad = bool(args.skip_bad_images)
        # False once every latent is cached: items then carry no pixels, and workers decode nothing
        self.decode_pixels = True
        # images known not to decode (from the cache's record): {image index: reason}, instance, class
        # and reference (editing pairs: indexed like their pair's instance image)
        self.unreadable: dict[int, str] = {}
        self.unreadable_class: dict[int, str] = {}
        self.unreadable_reference: dict[int, str] = {}
        self._members: dict[int, np.ndarray] = {}
        self._named: set[str] = set()

    @property
    def skipped(self) -> int:
        return len(self.scan.skipped)

    def __len__(self) -> int:
        return self.scan.num_samples

    def instance_of(self, index: int):
        return self.scan.samples[index % len(self.scan.samples)]

    def class_of(self, index: int):
        return self.scan.class_samples[index % len(self.scan.class_samples)]

    def target_size(self, index: int) -> tuple[int, int]:
        """(width, height) of sample index: its bucket, or the square crop."""
        if self.scan.buckets:
            return self.scan.buckets[self.scan.sample_bucket[index % len(self.scan.samples)]]
        return (self.resolution, self.resolution)

    def placement(self, index: int) -> Placement:
        return place(self.instance_of(index).size, self.target_size(index), self.center_crop, self.random_flip,
                     sample_rng(self.seed, index))

    def class_placement(self, index: int) -> Placement:
        return place(self.class_of(index).size, self.target_size(index), self.center_crop, self.random_flip,
                     sample_rng(self.seed, index, "class-crop"))

    def reference_of(self, index: int):
        return self.scan.references[index % len(self.scan.samples)]

    def reference_placement(self, index: int) -> Placement:
        """The reference image placed into its target's shape, with the target's crop draws and flip."""
        return place(self.reference_of(index).size, self.target_size(index), self.center_crop, self.random_flip,
                     sample_rng(self.seed, index))

    def pixels_at(self, index: int) -> torch.Tensor:
        """The pixels of latent index `index`: sample i (i >= 0), its class partner (-1 - i) or its
        reference image (REFERENCE + i, fluxkit.data.pairs)."""
        if index >= REFERENCE:
            i = index - REFERENCE
            ref = self.reference_of(i)
            image = to_rgb(open_image(self.scan.reference_source(ref), ref.name), self.background)
            return apply_placement(image, self.reference_placement(i), self.interpolation)
        if index >= 0:
            return self.pixels(self.instance_of(index), self.placement(index))
        return self.pixels(self.class_of(-1 - index), self.class_placement(-1 - index))

    def caption(self, index: int, epoch: int) -> str:
        text = self.instance_of(index).caption
        if self.caption_dropout_rate > 0 and sample_rng(self.seed, index, f"caption-dropout:{epoch}").random() < self.caption_dropout_rate:
            return ""
        return text

    def pixels(self, sample, placement: Placement) -> torch.Tensor:
        """Decode and place one image; UnreadableImage when its pixel data is damaged."""
        image = to_rgb(open_image(self.scan.source(sample), sample.name), self.background)
        return apply_placement(image, placement, self.interpolation)

    # ------------------------------------------------------------------ undecodable images

    def use_cached_latents(self, unreadable: dict[int, str] | None = None, unreadable_class: dict[int, str] | None = None,
                           unreadable_reference: dict[int, str] | None = None) -> None:
        """Every latent is cached: items carry no pixels. unreadable*: images the cache fill could not
        decode ({image index: reason}); their samples are replaced as a decode failure would be. The
        record is the cache folder's, read by every process after the fill: a pair whose reference
        another process found undecodable is replaced here by the same sample as there."""
        self.decode_pixels = False
        self.unreadable, self.unreadable_class = dict(unreadable or {}), dict(unreadable_class or {})
        self.unreadable_reference = dict(unreadable_reference or {})
        for known, samples in ((self.unreadable, self.scan.samples), (self.unreadable_class, self.scan.class_samples),
                               (self.unreadable_reference, self.scan.references or [])):
            self._named.update(skipped_name(samples[i].name, reason) for i, reason in known.items())  # the fill named them

    def _sample_pixels(self, index: int) -> tuple[dict, list[str]]:
        """(pixel tensors of sample index, or {} when latents are cached; "NAME (reason)" of each of its
        images that does not decode). Without --skip_bad_images a bad image raises UnreadableImage."""
        out, bad = {}, []
        parts = [("pixel_values", self.instance_of, self.placement, self.unreadable, len(self.scan.samples))]
        if self.scan.class_samples:
            parts.append(("class_pixel_values", self.class_of, self.class_placement, self.unreadable_class,
                          len(self.scan.class_samples)))
        if self.scan.references:
            parts.append(("cond_pixel_values", self.reference_of, None, self.unreadable_reference, len(self.scan.samples)))
        for field_name, sample_of, placement_of, known, count in parts:
            sample = sample_of(index)
            try:
                if index % count in known:
                    raise UnreadableImage(sample.name, known[index % count])
                if self.decode_pixels:
                    out[field_name] = self.pixels_at(REFERENCE + index) if placement_of is None else \
                        self.pixels(sample, placement_of(index))
            except UnreadableImage as err:
                if not self.skip_bad:
                    raise
                bad.append(skipped_name(err.name, err.reason))
        return out, bad

    def _same_bucket(self, index: int) -> np.ndarray:
        """Every sample index whose target shape is sample index's (all of them without buckets)."""
        bucket = int(self.scan.sample_bucket[index % len(self.scan.samples)]) if self.scan.buckets else 0
        if bucket not in self._members:
            every = np.arange(len(self))
            self._members[bucket] = every if not self.scan.buckets else \
                every[self.scan.sample_bucket[every % len(self.scan.samples)] == bucket]
        return self._members[bucket]

    def readable_sample(self, index: int, epoch: int) -> tuple[int, dict, list[str]]:
        """(the sample to show for index: itself, or with --skip_bad_images a replacement from its bucket
        when one of its images does not decode; that sample's pixels; the images skipped on the way).
        The replacement is drawn from (seed, epoch, index): the same in every run and on resume."""
        pixels, skipped = self._sample_pixels(index)
        if not skipped:
            return index, pixels, []
        members = self._same_bucket(index)
        rng = sample_rng(self.seed, index, f"substitute:{epoch}")
        draws = [int(members[rng.randrange(len(members))]) for _ in range(SUBSTITUTE_DRAWS)]
        start = rng.randrange(len(members))
        walk = (int(members[(start + k) % len(members)]) for k in range(len(members)))  # ends the search
        for candidate in itertools.chain(draws, walk):
            pixels, bad = self._sample_pixels(candidate)
            if not bad:
                return candidate, pixels, sorted(set(skipped))
            skipped += bad
        width, height = self.target_size(index)
        raise UserError(f"no image of the {width}x{height} samples decodes (e.g. {skipped[0]}); "
                        "remove or repair the damaged files")

    def __getitem__(self, key: int) -> dict:
        epoch, index = divmod(int(key), len(self))
        try:
            index, pixels, skipped = self.readable_sample(index, epoch)
        except UserError as err:  # raised by checked_batches in the training process, not in a worker
            return {"unreadable": str(err)}
        item = {"index": index, "prompt": self.caption(index, epoch), **pixels}
        if self.scan.class_samples:
            item["class_prompt"] = self.class_prompt
        if skipped:
            item["skipped"] = skipped
        return item

    def checked_batches(self, batches):
        """The loader's batches in the training process: a batch that could not be made raises its
        error (one line); each image skipped by --skip_bad_images is named once."""
        for batch in batches:
            if "unreadable" in batch:
                raise UserError(batch["unreadable"])
            for name in batch.pop("skipped", ()):
                if name not in self._named:
                    self._named.add(name)
                    say_skipped(name)
            yield batch


def collate(examples: list[dict]) -> dict:
    """Instance samples first, then their class partners (the loss splits the batch in two).
    pixel_values is None when the dataset decodes none (every latent cached)."""
    failed = [e["unreadable"] for e in examples if "unreadable" in e]
    if failed:
        return {"unreadable": failed[0]}
    pixels = "pixel_values" in examples[0]
    batch = {
        "index": torch.tensor([e["index"] for e in examples]),
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]) if pixels else None,
        "prompts": [e["prompt"] for e in examples],
        "is_class": torch.zeros(len(examples), dtype=torch.bool),
    }
    if "cond_pixel_values" in examples[0]:
        batch["cond_pixel_values"] = torch.stack([e["cond_pixel_values"] for e in examples])
    skipped = sorted({name for e in examples for name in e.get("skipped", ())})
    if skipped:
        batch["skipped"] = skipped
    if "class_prompt" in examples[0]:
        batch["index"] = torch.cat([batch["index"], -1 - batch["index"]])  # class samples: negative keys
        if pixels:
            batch["pixel_values"] = torch.cat([batch["pixel_values"], torch.stack([e["class_pixel_values"] for e in examples])])
        batch["prompts"] = batch["prompts"] + [e["class_prompt"] for e in examples]
        batch["is_class"] = torch.cat([batch["is_class"], torch.ones(len(examples), dtype=torch.bool)])
    return batch


# ------------------------------------------------------------------------------------ samplers

def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100003 + epoch)


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation that depends only on (seed, epoch): resuming at any step replays the same order.
    Yields epoch * length + i (the dataset splits it again) so per-epoch randomness needs no state."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        offset = self.epoch * self.length
        return iter((torch.randperm(self.length, generator=_epoch_generator(self.seed, self.epoch)) + offset).tolist())

    def __len__(self) -> int:
        return self.length


def default_num_workers(processes_per_machine: int = 1) -> int:
    """DataLoader workers per process: the cores this process may use, less one for the process
    itself, shared among the processes on the machine; never more cores than there are."""
    cores = usable_cpus()
    return max(0, min(8, cores // max(1, processes_per_machine) - 1))


def stop_workers(loader) -> None:
    """Stop a loader's persistent worker processes now, at the end of the run that made them. Left to the
    garbage collector, they are stopped after their queues were closed, so each waits out torch's 5 s
    timeout (a second run in the same process stalled 10 s with 2 workers)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def add_flags(g, lora: bool, need_prompt: bool = True) -> None:
    """The data flags (diffusers' names and defaults, and ours) on a parser or group; need_prompt=False
    for a run described without its data (the memory plan)."""
    g.add_argument("--dataset_name", default=None, help="a local dataset folder, parquet file or hub id with images and captions")
    g.add_argument("--dataset_config_name", default=None, help="dataset config (hub datasets only)")
    g.add_argument("--instance_data_dir", default=None, help="folder of instance images (used when --dataset_name is not given)")
    g.add_argument("--image_column", default="image", help="image column of --dataset_name")
    g.add_argument("--caption_column", default=None, help="caption column of --dataset_name (else --instance_prompt for all)")
    g.add_argument("--cond_image_column", default=None,
                   help="editing families (Kontext, FLUX.2): the reference-image column of --dataset_name (fluxkit.data.pairs)")
    g.add_argument("--cond_image_dir", default=None,
                   help="(ours) editing families: a folder of reference images named like the targets in --instance_data_dir")
    g.add_argument("--repeats", type=int, default=1, help="how many times to repeat the training data")
    g.add_argument("--instance_prompt", default=None, required=need_prompt, help="prompt with the identifier of the instance, e.g. 'a photo of sks dog'")
    g.add_argument("--class_data_dir", default=None, help="folder of class images for prior preservation (filled up when short)")
    g.add_argument("--class_prompt", default=None, help="prompt for class images, e.g. 'a photo of dog'")
    g.add_argument("--num_class_images", type=int, default=100, help="class images wanted; missing ones are generated with the base model")
    g.add_argument("--with_prior_preservation", action="store_true", help="add the prior-preservation loss")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="weight of the prior-preservation loss")
    g.add_argument("--resolution", type=int, default=512, help="training resolution (a multiple of 16)")
    g.add_argument("--center_crop", action="store_true", help="center crop (default: random crop)")
    g.add_argument("--random_flip", action="store_true", help="randomly flip images horizontally")
    g.add_argument("--image_interpolation_mode", default="lanczos", choices=INTERPOLATION_MODES, help="resize filter")
    g.add_argument("--max_sequence_length", type=int, default=512 if lora else 77,
                   help="T5 tokens per prompt (at most 512; upstream's defaults: 77 full, 512 LoRA)")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="DataLoader worker processes per process, which decode images (upstream's default 0; the "
                        "launchers' auto picks from the cores per process)")
    g.add_argument("--skip_bad_images", action="store_true", help="(ours) skip unreadable images with a count instead of stopping")
    g.add_argument("--caption_extension", default=".txt", help="(ours) caption file beside each image: IMAGE.txt")
    g.add_argument("--caption_dropout_rate", type=float, default=0.0, help="(ours) fraction of samples trained with the empty caption")
    g.add_argument("--alpha_background", default="white", help="(ours) colour transparent images are composited on (name or #rrggbb)")


def validate(args) -> None:
    """The data flags' checks: one line naming the flag."""
    if args.dataloader_num_workers < 0:
        raise UserError(f"--dataloader_num_workers {args.dataloader_num_workers} must be 0 or more")
    if not 0.0 <= args.caption_dropout_rate < 1.0:
        raise UserError(f"--caption_dropout_rate {args.caption_dropout_rate} must be in [0, 1)")
    if not args.caption_extension.startswith(".") or len(args.caption_extension) < 2:
        raise UserError(f"--caption_extension {args.caption_extension!r} must look like .txt")
    parse_color(args.alpha_background)
