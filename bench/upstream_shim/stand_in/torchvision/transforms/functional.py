"""The functional transforms diffusers' DreamBooth scripts call, on PIL images (tensors where
torchvision takes tensors), with torchvision's argument order: crops take (top, left, h, w),
sizes are (h, w), and resize(int) sets the shorter side."""

import numpy as np
import torch


def crop(image, top, left, height, width):
    return image.crop((left, top, left + width, top + height))


def center_crop(image, output_size):
    th, tw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    top = int(round((image.height - th) / 2.0))
    left = int(round((image.width - tw) / 2.0))
    return crop(image, top, left, th, tw)


def resize(image, size, interpolation=None):
    from . import InterpolationMode, Resize

    return Resize(size, interpolation or InterpolationMode.BILINEAR)(image)


def hflip(image):
    from PIL import Image

    return image.transpose(Image.FLIP_LEFT_RIGHT)


def to_tensor(image):
    arr = np.asarray(image, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def normalize(tensor, mean, std):
    mean = torch.as_tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return (tensor - mean) / std


def to_pil_image(pic):
    from PIL import Image

    if isinstance(pic, torch.Tensor):
        pic = (pic.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    arr = np.asarray(pic)
    return Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
