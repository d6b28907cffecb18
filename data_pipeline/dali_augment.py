"""RandAugment ops as DALI graph functions, matching pil_augment's (timm's) definitions.

Each op is `(data, param) -> data` on uint8 HWC images, picked per sample by
`auto_aug.core.select` with the plan's op index; param is the plan's per-sample value
(CPU), moved next to the data where arithmetic needs it. Known differences: DALI's
equalize follows OpenCV's lookup table, Pillow's differs slightly; DALI's warps
(warp_affine, rotate) are bilinear only, where timm and the torch backend resample the
geometric ops bicubically (31-45 dB apart on photos, tests/test_data_dali.py).
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations as dali_aug

from .plan import RA_OPS


def dali_params(ra_op: np.ndarray, ra_param: np.ndarray) -> np.ndarray:
    """float32 for DALI; posterize's bit count becomes the bit mask DALI ands with."""
    param = ra_param.astype(np.float32)
    posterize = ra_op == RA_OPS.index("posterize")
    bits = param[posterize].astype(np.int64)
    param[posterize] = 255 ^ ((1 << (8 - bits)) - 1)
    return param


def _like(param, data):
    """A per-sample CPU parameter on the device of the data it combines with."""
    return param.gpu() if data.device == "gpu" else param


def _constant(value: np.ndarray, like):
    return types.Constant(value, device=like.device)


def _as_float(data):
    return fn.cast(data, dtype=types.FLOAT)


def _framed(data, size: int, fill):
    """The image in a one-pixel frame of the fill colour. A warp that clamps its source
    coordinates (DALI's fast path: warps with a fill value cost about twice as much on the
    CPU, and take one value, not a colour) then repeats the frame wherever it lands
    outside the image, so it reads the fill there, as PIL's fillcolor gives."""
    return fn.slice(
        data,
        types.Constant(np.array([-1, -1], np.float32)),
        types.Constant(np.array([size + 2, size + 2], np.float32)),
        axis_names="HW",
        out_of_bounds_policy="pad",
        fill_values=list(fill),
        normalized_anchor=False,
        normalized_shape=False,
    )


def _affine(data, param, size, fill, entry):
    """PIL's AFFINE transform (output -> input map) with one matrix entry set by param."""
    unit = np.zeros((2, 3), np.float32)
    unit[entry] = size if entry[1] == 2 else 1  # translations are fractions of the side
    frame = np.array([[1, 0, 1], [0, 1, 1]], np.float32)  # identity, shifted into the frame
    matrix = types.Constant(frame) + types.Constant(unit) * param
    return fn.warp_affine(
        _framed(data, size, fill),
        matrix=matrix,
        size=[size, size],
        inverse_map=True,
        interp_type=types.INTERP_LINEAR,
    )


def rand_augment_ops(size: int, fill: tuple[int, int, int]) -> list:
    """One graph function per RA_OPS entry, each (data, param) -> data, uint8 HWC."""
    blur = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13  # PIL's SMOOTH

    def rotate(data, param):  # about the centre: the frame's centre is the image's
        framed = _framed(data, size, fill)
        return fn.rotate(framed, angle=param, size=[size, size], interp_type=types.INTERP_LINEAR)

    def solarize(data, param):  # 255 - x == x ^ 255 for uint8
        inverted = fn.cast(data >= _like(param, data), dtype=types.UINT8)
        return data ^ (inverted * _constant(np.uint8(255), data))

    def solarize_add(data, param):  # x < 128 and add <= 110: the sum stays below 256
        shifted = fn.cast(data < _constant(np.uint8(128), data), dtype=types.UINT8)
        return data + shifted * _like(fn.cast(param, dtype=types.UINT8), data)

    def blend(data, degenerate, param):  # PIL ImageEnhance: degenerate + f * (image - degenerate)
        out = degenerate + (_as_float(data) - degenerate) * _like(param, data)
        return fn.cast(dmath.clamp(out, 0, 255), dtype=types.UINT8)

    def sharpness(data, param):
        smooth = fn.filter(_as_float(data), _constant(blur, data))
        return blend(data, smooth, param)

    ops = {
        "identity": lambda data, param: data,
        "auto_contrast": lambda data, param: dali_aug.auto_contrast.op(data, None),
        "equalize": lambda data, param: fn.equalize(data),
        "invert": lambda data, param: dali_aug.invert.op(data, None),
        "rotate": rotate,
        "posterize": lambda data, param: data & _like(fn.cast(param, dtype=types.UINT8), data),
        "solarize": solarize,
        "solarize_add": solarize_add,
        "color": lambda data, param: fn.saturation(data, saturation=param),
        "contrast": lambda data, param: dali_aug.contrast.op(data, _like(param, data)),
        "brightness": lambda data, param: fn.brightness(data, brightness=param),
        "sharpness": sharpness,
        "shear_x": lambda data, param: _affine(data, param, size, fill, (0, 1)),
        "shear_y": lambda data, param: _affine(data, param, size, fill, (1, 0)),
        "translate_x": lambda data, param: _affine(data, param, size, fill, (0, 2)),
        "translate_y": lambda data, param: _affine(data, param, size, fill, (1, 2)),
    }
    return [ops[name] for name in RA_OPS]
