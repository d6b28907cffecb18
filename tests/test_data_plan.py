"""The augmentation plan: purity, and the distributions of torchvision / timm."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import RandomResizedCrop

from deit_fast.data_pipeline.plan import RA_OPS, AugmentationPlan, RandAugmentConfig
from tests.helpers import recipe_plan


def _fields(d):
    return {k: getattr(d, k) for k in ("crop", "flip", "ra_op", "ra_param", "erase")}


def test_same_key_same_decisions_whatever_the_batch():
    plan = AugmentationPlan(recipe_plan(), seed=3)
    n = 64
    views, samples = np.arange(n) % 5, np.arange(n) * 7
    heights, widths = 100 + np.arange(n), 300 - np.arange(n)
    whole = _fields(plan.draw(views, samples, heights, widths))
    order = np.random.default_rng(0).permutation(n)[:17]
    part = _fields(plan.draw(views[order], samples[order], heights[order], widths[order]))
    for name, value in whole.items():
        np.testing.assert_array_equal(value[order], part[name], err_msg=name)
    one = _fields(plan.draw(views[5:6], samples[5:6], heights[5:6], widths[5:6]))
    for name, value in whole.items():
        np.testing.assert_array_equal(value[5:6], one[name], err_msg=name)
    other_seed = AugmentationPlan(recipe_plan(), seed=4).draw(views, samples, heights, widths)
    assert not np.array_equal(other_seed.crop, whole["crop"])


def test_same_decisions_in_another_process():
    code = (
        "from deit_fast.data_pipeline.plan import AugmentationPlan;"
        "from tests.helpers import recipe_plan;"
        "d = AugmentationPlan(recipe_plan(), 11).draw([2, 9], [5, 1234567], [375, 80], [500, 60]);"
        "print(d.crop.tolist(), d.flip.tolist(), d.ra_op.tolist(), d.ra_param.tolist(),"
        " d.erase.tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    d = AugmentationPlan(recipe_plan(), 11).draw([2, 9], [5, 1234567], [375, 80], [500, 60])
    here = [
        d.crop.tolist(),
        d.flip.tolist(),
        d.ra_op.tolist(),
        d.ra_param.tolist(),
        d.erase.tolist(),
    ]
    assert out.stdout.strip() == " ".join(str(x) for x in here)


@pytest.mark.parametrize("height,width", [(375, 500), (40, 400), (33, 21)])
def test_crops_inside_and_distributed_like_torchvision(height, width):
    n = 4000
    plan = AugmentationPlan(recipe_plan(), seed=0)
    crop = plan.draw(np.zeros(n, np.int64), np.arange(n), height, width).crop
    top, left, h, w = crop.T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    torch.manual_seed(0)
    img = torch.empty(1, height, width)
    ref = np.array(
        [RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    )
    for name, mine, theirs in (
        ("area", h * w, ref[:, 2] * ref[:, 3]),
        ("log aspect", np.log(w / h), np.log(ref[:, 3] / ref[:, 2])),
        ("centre y", top + h / 2, ref[:, 0] + ref[:, 2] / 2),
        ("centre x", left + w / 2, ref[:, 1] + ref[:, 3] / 2),
    ):
        assert stats.ks_2samp(mine, theirs).pvalue > 1e-3, name


def test_centre_crop_fallback_matches_torchvision():
    # a 10x1000 strip makes every attempt fail; torchvision then takes the centred crop
    plan = AugmentationPlan(recipe_plan(), seed=0)
    crop = plan.draw(np.zeros(50, np.int64), np.arange(50), 10, 1000).crop
    expected = RandomResizedCrop.get_params(torch.empty(1, 10, 1000), [0.08, 1.0], [3 / 4, 4 / 3])
    assert (crop == np.array(expected)).all(1).mean() > 0.9


def test_flip_rand_augment_and_erasing_rates():
    n = 20000
    params = recipe_plan(image_size=224)
    d = AugmentationPlan(params, seed=1).draw(np.ones(n, np.int64), np.arange(n), 375, 500)
    assert abs(d.flip.mean() - 0.5) < 0.02
    assert d.ra_op.shape == (n, 2)
    assert abs((d.ra_op == 0).mean() - 0.5) < 0.02  # each layer applied with p = 0.5
    counts = np.bincount(d.ra_op[d.ra_op > 0], minlength=len(RA_OPS))[1:]
    assert stats.chisquare(counts).pvalue > 1e-3  # the 15 ops equally likely
    rotate = np.abs(d.ra_param[d.ra_op == RA_OPS.index("rotate")])
    assert abs(rotate.mean() - 27) < 0.5 and rotate.max() <= 30  # N(9, 0.5) clipped at 10
    posterize = d.ra_param[d.ra_op == RA_OPS.index("posterize")]
    # inc1: max(1, 4 - floor(m / 10 * 4)) bits; m ~ N(9, 0.5) is >= 7.5 99.9% of the time
    assert set(np.unique(posterize)) <= {1.0, 2.0} and (posterize == 1).mean() > 0.99
    top, left, h, w = d.erase.T
    erased = h > 0
    assert abs(erased.mean() - 0.25) < 0.02
    area = h[erased] * w[erased] / 224**2
    assert area.min() >= 0.015 and area.max() <= 0.34 and abs(area.mean() - 0.177) < 0.01
    assert (top + h <= 224).all() and (left + w <= 224).all()


def test_erase_noise_is_keyed_and_standard_normal():
    plan = AugmentationPlan(recipe_plan(), seed=0)
    a, b = plan.erase_noise(3, 7, 50, 60), plan.erase_noise(3, 7, 50, 60)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 50, 60) and a.dtype == np.float32
    assert not np.array_equal(a, plan.erase_noise(3, 8, 50, 60))
    assert abs(a.mean()) < 0.05 and abs(a.std() - 1) < 0.05


def test_rand_augment_off_and_parsing():
    d = AugmentationPlan(recipe_plan(rand_augment=None), 0).draw([0], [0], 10, 10)
    assert d.ra_op.shape == (1, 0)
    cfg = RandAugmentConfig.parse("rand-m7-n3-mstd0-inc0")
    assert (cfg.magnitude, cfg.num_layers, cfg.magnitude_std, cfg.increasing) == (7, 3, 0, False)
    with pytest.raises(ValueError, match="'x5'.*accepted keys"):
        recipe_plan(rand_augment="rand-m9-x5")
    with pytest.raises(ValueError, match="must start with 'rand-'"):
        recipe_plan(rand_augment="auto-m9")
    with pytest.raises(ValueError, match="remode 'zeros'"):
        recipe_plan(remode="zeros")


def test_enhance_factor_follows_timm_increasing_mapping():
    plan = AugmentationPlan(recipe_plan(rand_augment="rand-m10-mstd0-p1-inc1"), 0)
    d = plan.draw(np.zeros(2000, np.int64), np.arange(2000), 64, 64)
    brightness = d.ra_param[d.ra_op == RA_OPS.index("brightness")]
    np.testing.assert_allclose(np.unique(brightness), [0.1, 1.9], atol=1e-6)
    shear = np.unique(d.ra_param[d.ra_op == RA_OPS.index("shear_x")])
    np.testing.assert_allclose(shear, [-0.3, 0.3], atol=1e-6)
    assert math.isclose(np.unique(d.ra_param[d.ra_op == RA_OPS.index("solarize")])[0], 0.0)
    plain = AugmentationPlan(recipe_plan(rand_augment="rand-m10-mstd0-p1"), 0)  # timm: inc0
    d = plain.draw(np.zeros(2000, np.int64), np.arange(2000), 64, 64)
    np.testing.assert_allclose(np.unique(d.ra_param[d.ra_op == RA_OPS.index("brightness")]),
                               [1.9], atol=1e-6)
