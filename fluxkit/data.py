"""Training data for DreamBooth: instance folders, captioned datasets, prior-preservation classes.

Images are decoded and transformed once, when the dataset is built (resize, crop, flip), with a
seeded generator, as diffusers' DreamBooth examples do. A sample's pixels therefore depend only on
its index, which is what makes caching its latents by index exact. No torchvision: PIL and numpy.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
INTERPOLATION_MODES = ("lanczos", "bilinear", "bicubic", "nearest", "box", "hamming")


def _resample(mode: str):
    from PIL import Image

    table = {"lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
             "nearest": Image.NEAREST, "box": Image.BOX, "hamming": Image.HAMMING}
    if mode.lower() not in table:
        raise UserError(f"--image_interpolation_mode {mode!r} is not one of {', '.join(INTERPOLATION_MODES)}")
    return table[mode.lower()]


@dataclass(frozen=True)
class ImageTransform:
    resolution: int
    center_crop: bool = False
    random_flip: bool = False
    interpolation: str = "lanczos"

    def __call__(self, image, rnd: random.Random) -> torch.Tensor:
        """PIL image -> float tensor (3, R, R) in [-1, 1]: resize shorter side, crop, maybe flip."""
        from PIL import Image, ImageOps

        image = ImageOps.exif_transpose(image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        r = self.resolution
        w, h = image.size
        scale = r / min(w, h)
        new_w, new_h = max(r, round(w * scale)), max(r, round(h * scale))
        image = image.resize((new_w, new_h), resample=_resample(self.interpolation))
        if self.center_crop:
            left, top = (new_w - r) // 2, (new_h - r) // 2
        else:
            left, top = rnd.randint(0, new_w - r), rnd.randint(0, new_h - r)
        image = image.crop((left, top, left + r, top + r))
        if self.random_flip and rnd.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _open_image(path_or_image, name: str, skip_bad: bool):
    """Decode fully (so a truncated file fails here, naming itself), or None when skipping."""
    from PIL import Image

    try:
        img = Image.open(path_or_image) if not hasattr(path_or_image, "load") else path_or_image
        img.load()
        return img
    except Exception as err:  # PIL raises many types for bad files
        if skip_bad:
            return None
        raise UserError(f"cannot read image {name!r} ({type(err).__name__}: {err}); "
                        "fix or remove it, or pass --skip_bad_images to skip unreadable images") from None


def list_images(folder: str, flag: str) -> list[str]:
    if not folder or not os.path.isdir(folder):
        raise UserError(f"{flag} {folder!r} does not exist or is not a directory; point it at a folder of images")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))
    if not files:
        raise UserError(f"{flag} {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add some or fix the path")
    return files


def load_captioned_dataset(args) -> tuple[list, list[str]]:
    """--dataset_name as a local folder/parquet dataset (pokemon-blip-captions layout) or a hub id."""
    import datasets

    name = args.dataset_name
    is_local = os.path.exists(name)
    if is_local and os.path.isfile(name) and name.endswith(".parquet"):
        spec = dict(path="parquet", data_files={"train": name})
    elif is_local:
        spec = dict(path=name)
    else:
        spec = dict(path=name, name=args.dataset_config_name)
    try:
        ds = datasets.load_dataset(**spec, cache_dir=args.cache_dir, split="train")
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise UserError(f"--dataset_name {name!r} could not be loaded ({type(err).__name__}: {str(err)[:200]}); "
                        "give a local dataset folder or parquet file") from None
    except Exception as err:  # offline hub errors come in many types
        raise UserError(f"--dataset_name {name!r} could not be loaded ({type(err).__name__}); "
                        "give a local dataset folder or parquet file, or check the hub id and network") from None
    columns = ds.column_names
    image_column = args.image_column or columns[0]
    if image_column not in columns:
        raise UserError(f"--image_column {image_column!r} is not in dataset {name!r}; its columns are: {', '.join(columns)}")
    captions = None
    if args.caption_column is not None:
        if args.caption_column not in columns:
            raise UserError(f"--caption_column {args.caption_column!r} is not in dataset {name!r}; its columns are: {', '.join(columns)}")
        captions = [str(c) for c in ds[args.caption_column]]
    return ds[image_column], captions


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance samples (and class samples for prior preservation), transformed once.

    Item i is a dict: index (i), pixel_values, prompt, and class_pixel_values/class_prompt when
    prior preservation is on (class images cycle so every instance sample has a partner).
    """

    def __init__(self, args, class_images: list[str] | None = None, seed: int = 0):
        transform = ImageTransform(args.resolution, args.center_crop, args.random_flip, args.image_interpolation_mode)
        rnd = random.Random(seed)
        skip_bad = getattr(args, "skip_bad_images", False)
        self.skipped = 0

        if args.dataset_name:
            sources, captions = load_captioned_dataset(args)
            names = [f"{args.dataset_name}[{i}]" for i in range(len(sources))]
        else:
            sources = list_images(args.instance_data_dir, "--instance_data_dir")
            names, captions = sources, None

        pixels, prompts = [], []
        for i, (src, name) in enumerate(zip(sources, names)):
            image = _open_image(src, name, skip_bad)
            if image is None:
                self.skipped += 1
                continue
            caption = captions[i] if captions is not None else args.instance_prompt
            for _ in range(max(1, args.repeats)):
                pixels.append(transform(image, rnd))
                prompts.append(caption)
        if not pixels:
            raise UserError("no readable training images (all were skipped); check --instance_data_dir or --dataset_name")
        self.pixel_values, self.prompts = pixels, prompts

        self.class_pixel_values, self.class_prompt = [], None
        if class_images:
            for path in class_images:
                image = _open_image(path, path, skip_bad)
                if image is not None:
                    self.class_pixel_values.append(transform(image, rnd))
            self.class_prompt = args.class_prompt

    def __len__(self) -> int:
        return max(len(self.pixel_values), len(self.class_pixel_values))

    def __getitem__(self, index: int) -> dict:
        item = {"index": index, "pixel_values": self.pixel_values[index % len(self.pixel_values)],
                "prompt": self.prompts[index % len(self.prompts)]}
        if self.class_pixel_values:
            item["class_pixel_values"] = self.class_pixel_values[index % len(self.class_pixel_values)]
            item["class_prompt"] = self.class_prompt
        return item


def collate(examples: list[dict]) -> dict:
    """Instance samples first, then their class partners (the loss splits the batch in two)."""
    batch = {
        "index": torch.tensor([e["index"] for e in examples]),
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "prompts": [e["prompt"] for e in examples],
        "is_class": torch.zeros(len(examples), dtype=torch.bool),
    }
    if "class_pixel_values" in examples[0]:
        batch["index"] = torch.cat([batch["index"], -1 - batch["index"]])  # class samples: negative keys
        batch["pixel_values"] = torch.cat([batch["pixel_values"], torch.stack([e["class_pixel_values"] for e in examples])])
        batch["prompts"] = batch["prompts"] + [e["class_prompt"] for e in examples]
        batch["is_class"] = torch.cat([batch["is_class"], torch.ones(len(examples), dtype=torch.bool)])
    return batch


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation that depends only on (seed, epoch): resuming at any step replays the same order."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.length, generator=g).tolist())

    def __len__(self) -> int:
        return self.length
