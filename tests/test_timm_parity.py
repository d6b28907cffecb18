"""The recipe's random decisions mean what timm's mean (timm is what the official DeiT code
runs): RandAugment strings, magnitudes and ops pixel for pixel, the crop, random erasing,
and Mixup/CutMix images and targets on the same draw."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from skimage import data as photos
from timm.data import auto_augment
from timm.data import mixup as timm_mixup
from timm.data.auto_augment import AugmentOp, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation

from deit_fast.data_pipeline.mixup import cutmix_box
from deit_fast.data_pipeline.pil_augment import apply_rand_augment_op
from deit_fast.data_pipeline.plan import RA_OPS, AugmentationPlan, RandAugmentConfig
from tests.helpers import recipe_mixup, recipe_plan

FILL = (124, 116, 104)  # the recipe's fill: timm's img_mean for the ImageNet mean
# our op -> timm's op (the plain variant, then the one with inc1)
TIMM_OPS = {
    "auto_contrast": ("AutoContrast", "AutoContrast"),
    "equalize": ("Equalize", "Equalize"),
    "invert": ("Invert", "Invert"),
    "rotate": ("Rotate", "Rotate"),
    "posterize": ("Posterize", "PosterizeIncreasing"),
    "solarize": ("Solarize", "SolarizeIncreasing"),
    "solarize_add": ("SolarizeAdd", "SolarizeAdd"),
    "color": ("Color", "ColorIncreasing"),
    "contrast": ("Contrast", "ContrastIncreasing"),
    "brightness": ("Brightness", "BrightnessIncreasing"),
    "sharpness": ("Sharpness", "SharpnessIncreasing"),
    "shear_x": ("ShearX", "ShearX"),
    "shear_y": ("ShearY", "ShearY"),
    "translate_x": ("TranslateXRel", "TranslateXRel"),
    "translate_y": ("TranslateYRel", "TranslateYRel"),
}
RA_STRINGS = ["rand-m9-mstd0.5-inc1", "rand-m9", "rand-m7-n3", "rand-mstd1", "rand-m9-mstd101",
              "rand-m12-mmax15", "rand-m9-p0.3-inc0", "rand-n1-inc1", "rand-m0", "rand-mmax0-m15",
              "rand"]


# --------------------------------------------------------------------------- RandAugment
@pytest.mark.parametrize("text", RA_STRINGS)
def test_rand_augment_strings_read_as_timm_reads_them(text):
    theirs = rand_augment_transform(text, {"img_mean": FILL})
    op = theirs.ops[0]
    ours = RandAugmentConfig.parse(text)
    assert ours.num_layers == theirs.num_layers
    assert [TIMM_OPS[name][ours.increasing] for name in RA_OPS[1:]] == [o.name for o in theirs.ops]
    assert (ours.magnitude, ours.prob) == (op.magnitude, op.prob)
    assert ours.magnitude_std == op.magnitude_std  # inf for mstd > 100: uniform sampling
    assert ours.magnitude_max == (op.magnitude_max or 10)  # timm: mmax0 and none mean 10


def test_rand_augment_strings_timm_refuses_are_refused_with_the_reason():
    with pytest.raises(ValueError):  # timm: int("9.5")
        rand_augment_transform("rand-m9.5", {})
    with pytest.raises(ValueError, match=r"'m9.5' needs a number after 'm' \(an integer\)"):
        RandAugmentConfig.parse("rand-m9.5")
    with pytest.raises(ValueError, match=r"cannot read 'x5'; accepted keys: m, n, p, mstd"):
        recipe_plan(rand_augment="rand-m9-x5")
    with pytest.raises(ValueError, match=r"'tweights'.*transform sets.*not supported"):
        RandAugmentConfig.parse("rand-m9-tweights")
    with pytest.raises(ValueError, match="must start with 'rand-'"):
        recipe_plan(rand_augment="auto-m9")


def _timm_magnitudes(text: str, n: int) -> np.ndarray:
    """Magnitudes timm's Rotate draws under `text` (|angle| = 3 x magnitude)."""
    op = next(o for o in rand_augment_transform(text, {"img_mean": FILL}).ops
              if o.name == "Rotate")
    op.prob, angles = 1.0, []
    op.aug_fn = lambda img, angle, **kwargs: angles.append(abs(angle))
    random.seed(0)
    for _ in range(n):
        op(None)
    return np.array(angles) / 3


@pytest.mark.parametrize("text", ["rand-m9-mstd0.5-inc1", "rand-m9-mstd101", "rand-m9-mstd3",
                                  "rand-m12-mmax15-mstd2"])
def test_rand_augment_magnitudes_are_distributed_as_timm_draws_them(text):
    draws = AugmentationPlan(recipe_plan(rand_augment=f"{text}-n1-p1"), seed=0).draw(
        np.zeros(60000, np.int64), np.arange(60000), 64, 64)
    ours = np.abs(draws.ra_param[draws.ra_op == RA_OPS.index("rotate")]) / 3
    theirs = _timm_magnitudes(text, 4000)
    assert len(ours) > 3000
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3
    assert ours.max() <= RandAugmentConfig.parse(text).magnitude_max + 1e-4


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(photos.astronaut()).resize((64, 64), Image.Resampling.BICUBIC)


def _timm_op(name: str, magnitude: int, increasing: bool, sign: float, img, monkeypatch):
    """timm's op at a fixed magnitude and sign, resampling as the DeiT recipe asks (bicubic)."""
    op = AugmentOp(TIMM_OPS[name][increasing], prob=1.0, magnitude=magnitude,
                   hparams={"img_mean": FILL, "interpolation": Image.Resampling.BICUBIC})
    # _randomly_negate: -v when random.random() > 0.5
    monkeypatch.setattr(auto_augment.random, "random", lambda: 1.0 if sign < 0 else 0.0)
    return op(img)


@pytest.mark.parametrize("increasing", [False, True], ids=["inc0", "inc1"])
@pytest.mark.parametrize("magnitude", [3, 9, 10])
def test_each_op_matches_timm_pixel_for_pixel(photo, monkeypatch, magnitude, increasing):
    """Every op through the production path (the plan draws op, magnitude and sign, the
    torch backend applies it) equals timm's op at that magnitude and sign, pixel for pixel.
    The one exception: inc1 posterize at magnitude 10 asks timm for 0 bits, which Pillow
    refuses (timm raises); the plan keeps 1 bit."""
    text = f"rand-m{magnitude}-mstd0-n1-p1-inc{int(increasing)}"
    d = AugmentationPlan(recipe_plan(rand_augment=text), seed=1).draw(
        np.zeros(2000, np.int64), np.arange(2000), 64, 64)
    enhance = {"color", "contrast", "brightness", "sharpness"}
    signed = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}
    signed |= enhance if increasing else set()  # inc1: a factor below or above 1
    checked = set()
    for op, param in zip(d.ra_op[:, 0].tolist(), d.ra_param[:, 0].tolist()):
        name = RA_OPS[op]
        sign = -1.0 if param < (1 if name in enhance else 0) else 1.0
        if (name, sign) in checked:
            continue
        checked.add((name, sign))
        ours = np.asarray(apply_rand_augment_op(photo, op, param, FILL))
        if name == "posterize" and increasing and magnitude == 10:
            with pytest.raises(ValueError, match="bits must be between"):
                _timm_op(name, magnitude, increasing, sign, photo, monkeypatch)
            assert param == 1
            continue
        theirs = np.asarray(_timm_op(name, magnitude, increasing, sign, photo, monkeypatch))
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{name} sign {sign}")
    assert {name for name, _ in checked} == set(RA_OPS[1:])
    assert {(name, s) for name in signed for s in (-1.0, 1.0)} <= checked


# --------------------------------------------------------------------------- crop, erasing
def test_crop_is_distributed_as_timms_random_resized_crop():
    height, width, n = 375, 500, 4000
    crop = AugmentationPlan(recipe_plan(), seed=0).draw(np.zeros(n, np.int64), np.arange(n),
                                                        height, width).crop
    img = Image.new("RGB", (width, height))
    random.seed(0)
    ref = np.array([RandomResizedCropAndInterpolation.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
                    for _ in range(n)])
    top, left, h, w = crop.T
    for name, mine, theirs in (("area", h * w, ref[:, 2] * ref[:, 3]),
                               ("log aspect", np.log(w / h), np.log(ref[:, 3] / ref[:, 2])),
                               ("top", top, ref[:, 0]), ("left", left, ref[:, 1])):
        assert stats.ks_2samp(mine, theirs).pvalue > 1e-3, name


def test_erasing_boxes_are_distributed_as_timms_random_erasing():
    size, n = 224, 4000
    erase = AugmentationPlan(recipe_plan(reprob=0.25), seed=0).draw(
        np.zeros(n, np.int64), np.arange(n), 300, 300).erase
    eraser = RandomErasing(probability=0.25, mode="const", device="cpu")
    random.seed(0)
    boxes = []
    for _ in range(n):
        img = torch.ones(3, size, size)
        eraser(img)  # const mode fills zeros: the box is where the ones are gone
        rows, cols = torch.nonzero(img[0] == 0, as_tuple=True)
        boxes.append((rows.min(), cols.min(), rows.max() - rows.min() + 1,
                      cols.max() - cols.min() + 1) if len(rows) else (0, 0, 0, 0))
    ref = np.array(boxes, np.int64)
    ours, theirs = erase[erase[:, 2] > 0], ref[ref[:, 2] > 0]
    assert abs(len(ours) - len(theirs)) / n < 0.03  # both erase 25% of the images
    for i, name in enumerate(("top", "left", "height", "width")):
        assert stats.ks_2samp(ours[:, i], theirs[:, i]).pvalue > 1e-3, name


# --------------------------------------------------------------------------- Mixup, CutMix
@pytest.mark.parametrize("size", [(224, 224), (13, 7)])
def test_cutmix_box_is_timms_rand_bbox(monkeypatch, size):
    height, width = size
    rng = np.random.default_rng(0)
    for _ in range(200):
        lam, centre = rng.uniform(), (int(rng.integers(height)), int(rng.integers(width)))
        draws = iter(centre)
        monkeypatch.setattr(timm_mixup.np.random, "randint",
                            lambda *a, draws=draws, **k: next(draws))
        assert cutmix_box(lam, centre, height, width) == timm_mixup.rand_bbox(size, lam)


def test_mixed_batches_equal_timms_mixup_on_the_same_draw(monkeypatch):
    """timm's batch-mode Mixup (flip pairing, label-smoothed mixed targets, corrected CutMix
    lambda) given our lambda and box yields our images and targets."""
    batch, classes, height, width = 8, 5, 32, 24
    ours = recipe_mixup(classes, seed=3)  # mixup 0.8, cutmix 1.0, switch 0.5, smoothing 0.1
    theirs = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5,
                              mode="batch", label_smoothing=0.1, num_classes=classes)
    kinds = set()
    for step in range(40):
        images = torch.randn(batch, 3, height, width)
        labels = torch.randint(0, classes, (batch,))
        lam, box, pairing = ours.draw((0, step, 0), height, width, batch)
        mixed, targets = ours(images, labels, key=(0, step, 0))
        if pairing is None:
            continue
        kinds.add("cutmix" if box else "mixup")
        assert pairing.tolist() == list(range(batch))[::-1]
        monkeypatch.setattr(theirs, "_params_per_batch", lambda lam=lam, box=box: (lam, bool(box)))
        monkeypatch.setattr(timm_mixup, "rand_bbox", lambda *a, box=box, **k: box)
        expected_images, expected_targets = theirs(images.clone(), labels)
        torch.testing.assert_close(mixed, expected_images, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(targets, expected_targets, rtol=1e-6, atol=1e-7)
    assert kinds == {"mixup", "cutmix"}
