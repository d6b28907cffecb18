"""The augmentation plan: every random decision of one training image, from its key.

Key. A view of a sample is keyed by (seed, view, sample). The sampler decides which view
each showing gets (RepeatedAugSampler.views: one per (cycle, repeat), mod V when a run
replays a teacher cache of V views); the repeat id lives inside the view, so the teacher
cache can ask for "view v of sample i" without knowing epochs. Each decision reads its own
fixed decision id under that key (see `_S_*`; the key's domain is keyed_random.Domain.PLAN),
so decisions never shift when others are added.

Decisions follow the DeiT recipe as timm's create_transform draws it (the official DeiT
code's): RandomResizedCrop (10 attempts, centre-crop fallback), horizontal flip, timm's
RandAugment (n ops drawn with replacement, each applied with probability p, magnitude m,
N(m, mstd) or uniform, clipped to [0, mmax], random sign: `RandAugmentConfig`), then
timm's RandomErasing (one box, area 2%-33%, aspect 0.3-3.3) in normalized space. The crop
needs the decoded image size: callers pass it from the file header. Everything is
vectorised numpy and a pure function of (key, image size). tests/test_timm_parity.py
compares each decision with timm's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numpy.typing import ArrayLike

from .keyed_random import Domain, generator, uniform

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

# RandAugment op table shared by both backends; "identity" stands for a skipped layer.
RA_OPS = (
    "identity",
    "auto_contrast",
    "equalize",
    "invert",
    "rotate",
    "posterize",
    "solarize",
    "solarize_add",
    "color",
    "contrast",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
_SIGNED_OPS = frozenset(
    (
        "rotate",
        "color",
        "contrast",
        "brightness",
        "sharpness",
        "shear_x",
        "shear_y",
        "translate_x",
        "translate_y",
    )
)
_ENHANCE_OPS = frozenset(("color", "contrast", "brightness", "sharpness"))

_ATTEMPTS = 10  # torchvision's RandomResizedCrop and timm's RandomErasing both try 10 times
_S_CROP_SCALE, _S_CROP_RATIO, _S_CROP_I, _S_CROP_J, _S_FLIP = 0, 10, 20, 21, 22
_S_RA = 30  # + 8 * layer + {0: op, 1: apply, 2-3: gaussian, 4: sign}
_S_ERASE, _S_ERASE_AREA, _S_ERASE_ASPECT, _S_ERASE_TOP, _S_ERASE_LEFT = 100, 101, 111, 121, 122
ERASE_MODES = ("pixel", "rand", "const")  # timm's RandomErasing modes
_ERASE_AREA = (0.02, 1 / 3)
_ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))


_RA_VALUE = re.compile(r"(\d.*)")  # timm splits a section at its first digit
_LEVEL_DENOM = 10.0  # timm: magnitude m is level m / 10 of each op's range


@dataclass(frozen=True)
class RandAugmentConfig:
    """timm's RandAugment string ("rand-m9-mstd0.5-inc1"), read as timm's
    `rand_augment_transform` reads it, with its defaults: m, the integer magnitude (10);
    n, ops per image (2); p, each op's probability (0.5); mstd, the std of the magnitude's
    noise (0; above 100 the magnitude is uniform in [0, m]); mmax, the integer the magnitude
    is clipped to (10; 0 means 10); inc, 0 or 1, the ops whose strength grows with the
    magnitude (0). The DeiT recipe spells every key it relies on."""

    magnitude: int = 10
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0  # inf: uniform in [0, magnitude]
    magnitude_max: int = 10
    increasing: bool = False

    @classmethod
    def parse(cls, text: str) -> RandAugmentConfig:
        parts = text.split("-")
        if parts[0] != "rand":
            raise ValueError(
                f"rand_augment {text!r}: must start with 'rand-', e.g. 'rand-m9-mstd0.5-inc1'"
            )
        readers = {
            "m": ("magnitude", int),
            "n": ("num_layers", int),
            "p": ("prob", float),
            "mstd": ("magnitude_std", lambda v: math.inf if float(v) > 100 else float(v)),
            "mmax": ("magnitude_max", lambda v: int(v) or int(_LEVEL_DENOM)),
            "inc": ("increasing", lambda v: bool(int(v))),
        }
        values = {}
        for part in parts[1:]:
            name, value = (_RA_VALUE.split(part) + [""])[:2]
            if name not in readers:
                raise ValueError(
                    f"rand_augment {text!r}: cannot read {part!r}; accepted keys: "
                    f"{', '.join(readers)} (timm's transform sets, 't...', are not supported)"
                )
            field, read = readers[name]
            try:
                values[field] = read(value)
            except ValueError:
                raise ValueError(
                    f"rand_augment {text!r}: {part!r} needs a number after {name!r}"
                    f"{' (an integer)' if read is int or name == 'mmax' else ''}"
                ) from None
        return cls(**values)


@dataclass(frozen=True)
class PlanParams:
    """What the plan draws from. The recipe's values have no defaults here: the trainer's
    config schema declares them, and the plan is built from the config."""

    image_size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float
    rand_augment: str | None
    reprob: float
    remode: str = "pixel"
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD

    def __post_init__(self) -> None:
        if self.remode not in ERASE_MODES:
            raise ValueError(f"remode {self.remode!r}: accepted {', '.join(ERASE_MODES)}")
        if not (0 < self.scale[0] <= self.scale[1]) or not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"scale {self.scale} and ratio {self.ratio} must be 0 < lo <= hi")
        _ = self.rand_augment_config  # a bad RandAugment string fails here, not mid-run

    @cached_property
    def rand_augment_config(self) -> RandAugmentConfig | None:
        return RandAugmentConfig.parse(self.rand_augment) if self.rand_augment else None

    @property
    def fill(self) -> tuple[int, int, int]:
        """Fill colour of RandAugment's geometric ops: the mean, as timm's img_mean."""
        return tuple(min(255, round(255 * m)) for m in self.mean)  # type: ignore[return-value]


@dataclass
class ViewDecisions:
    """Decisions for N views; boxes are (top, left, height, width), erase height 0 = no box."""

    crop: np.ndarray  # int64 [N, 4] in source-image pixels
    flip: np.ndarray  # bool [N]
    ra_op: np.ndarray  # int64 [N, L] index into RA_OPS
    ra_param: np.ndarray  # float64 [N, L] the op's parameter (degrees, factor, bits, ...)
    erase: np.ndarray  # int64 [N, 4] in output pixels


class AugmentationPlan:
    """Pure map from (seed, view, sample) and image size to a `ViewDecisions`."""

    def __init__(self, params: PlanParams, seed: int) -> None:
        self.params = params
        self.seed = int(seed)

    def draw(
        self, views: ArrayLike, samples: ArrayLike, heights: ArrayLike, widths: ArrayLike
    ) -> ViewDecisions:
        """Decisions for views[i] of samples[i], whose decoded size is heights[i] x widths[i]."""
        views, samples, heights, widths = np.broadcast_arrays(
            *(np.asarray(a, np.int64) for a in (views, samples, heights, widths))
        )
        u = lambda decision: uniform(Domain.PLAN, self.seed, views, samples, decision)
        p = self.params
        return ViewDecisions(
            crop=self._crop(u, heights, widths),
            flip=u(_S_FLIP) < p.hflip,
            **self._rand_augment(u, len(views)),
            erase=self._erase(u),
        )

    def erase_noise(self, view: int, sample: int, height: int, width: int) -> np.ndarray:
        """float32 [3, h, w] fill of view's erasing box in normalized space (timm's modes)."""
        g = generator(Domain.ERASE_NOISE, self.seed, view, sample)
        if self.params.remode == "pixel":
            return g.standard_normal((3, height, width), dtype=np.float32)
        if self.params.remode == "rand":
            return np.broadcast_to(
                g.standard_normal((3, 1, 1), dtype=np.float32), (3, height, width)
            )
        return np.zeros((3, height, width), np.float32)

    def _crop(self, u, height: np.ndarray, width: np.ndarray) -> np.ndarray:
        (s0, s1), (r0, r1) = self.params.scale, self.params.ratio
        attempts = np.arange(_ATTEMPTS)[:, None]
        area = (height * width)[None, :]
        target = area * (s0 + (s1 - s0) * u(_S_CROP_SCALE + attempts))
        log_r0, log_r1 = math.log(r0), math.log(r1)
        aspect = np.exp(log_r0 + (log_r1 - log_r0) * u(_S_CROP_RATIO + attempts))
        w = np.round(np.sqrt(target * aspect)).astype(np.int64)
        h = np.round(np.sqrt(target / aspect)).astype(np.int64)
        ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
        first = np.argmax(ok, axis=0)
        cols = np.arange(ok.shape[1])
        h, w, found = h[first, cols], w[first, cols], ok.any(axis=0)
        top = np.floor(u(_S_CROP_I) * (height - h + 1)).astype(np.int64)
        left = np.floor(u(_S_CROP_J) * (width - w + 1)).astype(np.int64)
        # torchvision's fallback: the largest centred crop whose aspect is clamped to ratio
        in_ratio = width / height
        fw = np.where(in_ratio > r1, np.round(height * r1), width).astype(np.int64)
        fh = np.where(in_ratio < r0, np.round(width / r0), height).astype(np.int64)
        box = np.stack([top, left, h, w], axis=1)
        fallback = np.stack([(height - fh) // 2, (width - fw) // 2, fh, fw], axis=1)
        return np.where(found[:, None], box, fallback)

    def _rand_augment(self, u, n: int) -> dict[str, np.ndarray]:
        cfg = self.params.rand_augment_config
        if cfg is None:
            return {"ra_op": np.zeros((n, 0), np.int64), "ra_param": np.zeros((n, 0))}
        layers = np.arange(cfg.num_layers)[:, None] * 8 + _S_RA
        op = 1 + np.floor(u(layers) * (len(RA_OPS) - 1)).astype(np.int64)
        op = np.where(u(layers + 1) < cfg.prob, op, 0)
        level = self._ra_magnitude(cfg, u, layers) / _LEVEL_DENOM
        sign = np.where(u(layers + 4) < 0.5, -1.0, 1.0)
        param = np.zeros_like(level)
        for index, name in enumerate(RA_OPS):
            mask = op == index
            if mask.any():
                param[mask] = rand_augment_param(name, level[mask], sign[mask], cfg.increasing)
        return {"ra_op": op.T.copy(), "ra_param": param.T.copy()}

    @staticmethod
    def _ra_magnitude(cfg: RandAugmentConfig, u, layers: np.ndarray) -> np.ndarray:
        """timm's AugmentOp: m, N(m, mstd) or uniform in [0, m], clipped to [0, mmax]."""
        if math.isinf(cfg.magnitude_std):
            magnitude = cfg.magnitude * u(layers + 2)
        else:  # Box-Muller from two keyed uniforms
            gauss = np.sqrt(-2 * np.log1p(-u(layers + 2))) * np.cos(2 * np.pi * u(layers + 3))
            magnitude = cfg.magnitude + cfg.magnitude_std * gauss
        return np.clip(magnitude, 0, cfg.magnitude_max)

    def _erase(self, u) -> np.ndarray:
        s = self.params.image_size
        attempts = np.arange(_ATTEMPTS)[:, None]
        lo, hi = _ERASE_AREA
        target = s * s * (lo + (hi - lo) * u(_S_ERASE_AREA + attempts))
        a0, a1 = _ERASE_LOG_ASPECT
        aspect = np.exp(a0 + (a1 - a0) * u(_S_ERASE_ASPECT + attempts))
        h = np.round(np.sqrt(target * aspect)).astype(np.int64)
        w = np.round(np.sqrt(target / aspect)).astype(np.int64)
        ok = (w < s) & (h < s)
        first = np.argmax(ok, axis=0)
        cols = np.arange(ok.shape[1])
        h, w = h[first, cols], w[first, cols]
        keep = ok.any(axis=0) & (u(_S_ERASE) < self.params.reprob)
        top = np.floor(u(_S_ERASE_TOP) * (s - h + 1)).astype(np.int64)
        left = np.floor(u(_S_ERASE_LEFT) * (s - w + 1)).astype(np.int64)
        return np.stack([top, left, h, w], axis=1) * keep[:, None]


def rand_augment_param(name: str, level: np.ndarray, sign: np.ndarray,
                       increasing: bool) -> np.ndarray:
    """timm's level_to_arg for op `name` of RA_OPS; level is magnitude / 10 (1.0 = timm's
    magnitude 10), sign the draw of timm's _randomly_negate (used by the signed ops)."""
    signed = level * sign if name in _SIGNED_OPS else level
    if name == "rotate":
        return 30 * signed
    if name in ("shear_x", "shear_y"):
        return 0.3 * signed
    if name in ("translate_x", "translate_y"):
        return 0.45 * signed  # fraction of the image side, timm's translate_pct
    if name == "posterize":  # bits kept; timm's 0 bits (inc1 at magnitude 10) is refused by
        bits = np.floor(level * 4)  # Pillow >= 10 (and DALI), so 1; 8 or more keeps the image
        return np.clip(4 - bits if increasing else bits, 1, 8)
    if name == "solarize":  # threshold
        threshold = np.minimum(256, np.floor(level * 256))
        return 256 - threshold if increasing else threshold
    if name == "solarize_add":
        return np.minimum(128, np.floor(level * 110))
    if name in _ENHANCE_OPS:  # blend factor, 1 = unchanged
        return np.maximum(0.1, 1 + 0.9 * signed) if increasing else 0.1 + 1.8 * level
    return np.zeros_like(level)


def replacement_sample(seed: int, view: int, sample: int, attempt: int, num_samples: int) -> int:
    """The sample shown instead of an unreadable one: a pure function of the key."""
    return int(uniform(Domain.REPLACEMENT, seed, view, sample, attempt) * num_samples)
