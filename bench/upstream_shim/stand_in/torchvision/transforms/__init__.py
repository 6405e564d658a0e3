"""Resize, CenterCrop, RandomCrop, RandomHorizontalFlip, ToTensor, Normalize and Compose on PIL
images, with torchvision's meaning (Resize(int) sets the shorter side; crops take (h, w))."""

import enum
import random

import numpy as np
import torch

from . import functional


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


def _pil_filter(mode):
    from PIL import Image

    return {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
            "lanczos": Image.LANCZOS}[InterpolationMode(mode).value]


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


class Compose:
    def __init__(self, steps):
        self.steps = list(steps)

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.interpolation = size, interpolation

    def __call__(self, image):
        w, h = image.size
        if isinstance(self.size, int):  # the shorter side becomes size, the aspect ratio kept
            if w <= h:
                new = (self.size, int(self.size * h / w))
            else:
                new = (int(self.size * w / h), self.size)
        else:
            new = (self.size[1], self.size[0])
        return image.resize(new, resample=_pil_filter(self.interpolation))


class CenterCrop:
    def __init__(self, size):
        self.size = _pair(size)

    def __call__(self, image):
        th, tw = self.size
        top = int(round((image.height - th) / 2.0))
        left = int(round((image.width - tw) / 2.0))
        return functional.crop(image, top, left, th, tw)


class RandomCrop:
    def __init__(self, size):
        self.size = _pair(size)

    @staticmethod
    def get_params(image, output_size):
        th, tw = output_size
        return random.randint(0, image.height - th), random.randint(0, image.width - tw), th, tw

    def __call__(self, image):
        return functional.crop(image, *self.get_params(image, self.size))


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image):
        from PIL import Image

        return image.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < self.p else image


class ToTensor:
    def __call__(self, image):
        arr = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = float(mean[0]), float(std[0])

    def __call__(self, tensor):
        return (tensor - self.mean) / self.std
