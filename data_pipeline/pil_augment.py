"""The plan's per-image decisions applied to a PIL image (the torch fallback's path).

RandAugment ops are timm's (the same PIL calls: shear and translate about the top-left
corner, rotate about the centre, bicubic resampling as the DeiT recipe's
train_interpolation gives them, geometric fill = the mean colour); the parameter of each
op comes ready-made from the plan (plan.rand_augment_param). tests/test_timm_parity.py
compares every op with timm's, pixel for pixel.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode

from .plan import RA_OPS


def _affine(img: Image.Image, coeffs: tuple, fill: tuple[int, int, int]) -> Image.Image:
    return img.transform(
        img.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BICUBIC, fillcolor=fill
    )


def _solarize_add(img: Image.Image, add: float) -> Image.Image:
    lut = [min(255, i + int(add)) if i < 128 else i for i in range(256)]
    return img.point(lut * 3)


def apply_rand_augment_op(
    img: Image.Image, op: int, param: float, fill: tuple[int, int, int]
) -> Image.Image:
    """One RandAugment op (index into RA_OPS) with its parameter."""
    name = RA_OPS[op]
    if name == "identity":
        return img
    if name == "auto_contrast":
        return ImageOps.autocontrast(img)
    if name == "equalize":
        return ImageOps.equalize(img)
    if name == "invert":
        return ImageOps.invert(img)
    if name == "rotate":
        return img.rotate(param, resample=Image.Resampling.BICUBIC, fillcolor=fill)
    if name == "posterize":
        return ImageOps.posterize(img, int(param))
    if name == "solarize":
        return ImageOps.solarize(img, int(param))
    if name == "solarize_add":
        return _solarize_add(img, param)
    if name == "color":
        return F.adjust_saturation(img, param)
    if name == "contrast":
        return F.adjust_contrast(img, param)
    if name == "brightness":
        return F.adjust_brightness(img, param)
    if name == "sharpness":
        return F.adjust_sharpness(img, param)
    if name == "shear_x":
        return _affine(img, (1, param, 0, 0, 1, 0), fill)
    if name == "shear_y":
        return _affine(img, (1, 0, 0, param, 1, 0), fill)
    if name == "translate_x":
        return _affine(img, (1, 0, param * img.size[0], 0, 1, 0), fill)
    return _affine(img, (1, 0, 0, 0, 1, param * img.size[1]), fill)  # translate_y


def augment_pil(
    img: Image.Image,
    crop: np.ndarray,
    flip: bool,
    ra_op: np.ndarray,
    ra_param: np.ndarray,
    size: int,
    fill: tuple[int, int, int],
) -> torch.Tensor:
    """Crop-resize (bicubic), flip and RandAugment one image; uint8 [3, size, size]."""
    top, left, height, width = (int(v) for v in crop)
    img = F.resized_crop(img, top, left, height, width, [size, size], InterpolationMode.BICUBIC)
    if flip:
        img = F.hflip(img)
    for op, param in zip(ra_op.tolist(), ra_param.tolist()):
        img = apply_rand_augment_op(img, op, param, fill)
    return F.pil_to_tensor(img)
