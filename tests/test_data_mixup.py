"""Mixup / CutMix: targets and images against hand computations and timm's mixup_target."""

import numpy as np
import pytest
import torch
from timm.data.mixup import mixup_target

from tests.helpers import recipe_mixup

B, C, S = 8, 5, 16


def _constant_batch():
    """Image i is filled with the value i, so every mixed pixel tells its sources."""
    images = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, S, S).clone()
    return images, torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])


def _one_hot(labels, smoothing):
    off = smoothing / C
    return torch.full((len(labels), C), off).scatter_(1, labels.view(-1, 1), 1 - smoothing + off)


def test_mixup_matches_a_hand_computation():
    images, labels = _constant_batch()
    mixup = recipe_mixup(C, seed=3, mixup=0.8, cutmix=0.0, label_smoothing=0.1)
    lam, box, perm = mixup.draw((4, 17, 0), S, S, B)
    assert box is None and 0 < lam < 1 and sorted(perm.tolist()) == list(range(B))
    extra = torch.softmax(torch.randn(B, C), 1)
    mixed, targets, mixed_extra = mixup(images, labels, key=(4, 17, 0), extra=extra)
    for i in range(B):
        j = int(perm[i])
        assert torch.allclose(mixed[i], torch.full((3, S, S), lam * i + (1 - lam) * j))
        expected = (
            lam * _one_hot(labels[i : i + 1], 0.1)[0]
            + (1 - lam) * _one_hot(labels[j : j + 1], 0.1)[0]
        )
        torch.testing.assert_close(targets[i], expected)
        torch.testing.assert_close(mixed_extra[i], lam * extra[i] + (1 - lam) * extra[j])
    assert torch.equal(images[:, 0, 0, 0], torch.arange(B, dtype=torch.float32))  # input intact


def test_cutmix_box_area_sets_lambda():
    images, labels = _constant_batch()
    mixup = recipe_mixup(C, seed=0, mixup=0.0, cutmix=1.0, label_smoothing=0.0)
    for step in range(20):
        mixed, targets, _ = mixup(images, labels, key=(0, step, 0))
        lam, (top, bottom, left, right), perm = mixup.draw((0, step, 0), S, S, B)
        for i in range(B):
            from_other = (mixed[i] != i).float().mean().item() if perm[i] != i else 0.0
            area = (bottom - top) * (right - left) / S**2
            assert from_other == pytest.approx(area if perm[i] != i else 0.0)
            assert lam == pytest.approx(1 - area)
            expected = (
                lam * _one_hot(labels[i : i + 1], 0)[0]
                + (1 - lam) * _one_hot(labels[perm[i] : perm[i] + 1], 0)[0]
            )
            torch.testing.assert_close(targets[i], expected)


def test_mix_agrees_with_timm_for_the_flip_permutation(monkeypatch):
    """timm's batch mode mixes each sample with the batch flipped: forced to draw that
    permutation, `Mixup.__call__` gives timm's targets and the hand-mixed images."""
    labels = torch.tensor([3, 1, 4, 1, 0, 2, 2, 4])
    images, extra = torch.randn(B, 3, S, S), torch.softmax(torch.randn(B, C), 1)
    mixup = recipe_mixup(C, mixup=0.8, cutmix=0.0, label_smoothing=0.1)
    lam, flip = 0.3, np.arange(B)[::-1].copy()
    monkeypatch.setattr(mixup, "draw", lambda key, height, width, batch: (lam, None, flip))
    mixed, targets, mixed_extra = mixup(images, labels, key=(0, 0, 0), extra=extra)
    torch.testing.assert_close(targets, mixup_target(labels, C, lam=lam, smoothing=0.1))
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
    torch.testing.assert_close(mixed_extra, lam * extra + (1 - lam) * extra.flip(0))


def test_off_gives_smoothed_one_hot_only():
    images, labels = _constant_batch()
    for mixup in (
        recipe_mixup(C, mixup=0, cutmix=0),
        recipe_mixup(C, mixup_prob=0),
    ):
        out, targets, extra = mixup(images, labels, key=(1, 2, 0))
        assert torch.equal(out, images) and extra is None  # prob=0 still runs the blend, at 1
        torch.testing.assert_close(targets, _one_hot(labels, 0.1))


def test_draws_are_keyed_and_follow_the_recipe_rates():
    mixup = recipe_mixup(C, mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5)
    draws = [mixup.draw((0, step, 0), 224, 224, 4) for step in range(2000)]
    again = mixup.draw((0, 5, 0), 224, 224, 4)
    assert again[0] == draws[5][0] and np.array_equal(again[2], draws[5][2])
    cutmix = np.mean([box is not None for _, box, _ in draws])
    assert abs(cutmix - 0.5) < 0.05
    lams = np.array([lam for lam, box, _ in draws if box is None])
    assert (
        abs(lams.mean() - 0.5) < 0.03 and abs(lams.var() - 0.64 / (1.6**2 * 2.6)) < 0.01
    )  # Beta(0.8, 0.8)
    sometimes = recipe_mixup(C, mixup_prob=0.3)
    applied = np.mean([sometimes.draw((1, s, 0), 8, 8, 4)[2] is not None for s in range(2000)])
    assert abs(applied - 0.3) < 0.04


def test_integer_extra_is_refused():
    images, labels = _constant_batch()
    with pytest.raises(TypeError, match="extra must be a floating tensor"):
        recipe_mixup(C)(images, labels, key=(0, 0, 0), extra=labels)


def _sliced_mix(mixup, images, labels, key, extra):
    """The data-dependent-slice CutMix the fixed-shape one replaced: the reference."""
    targets = mixup.smooth_one_hot(labels)
    lam, box, perm = mixup.draw(key, images.shape[-2], images.shape[-1], len(images))
    if perm is None:
        return images, targets, extra
    perm = torch.from_numpy(perm)
    if box is None:
        images = torch.lerp(images[perm], images, lam)
    else:
        top, bottom, left, right = box
        images = images.clone()
        images[:, :, top:bottom, left:right] = images[perm, :, top:bottom, left:right]
    return images, torch.lerp(targets[perm], targets, lam), torch.lerp(extra[perm], extra, lam)


@pytest.mark.parametrize("size", [(16, 16), (13, 7), (1, 1)])
def test_fixed_shape_mix_equals_the_sliced_one(size):
    """Every kind of batch (Mixup, CutMix, boxes at the borders, unmixed) on random images."""
    height, width = size
    mixup = recipe_mixup(C, seed=7, mixup=0.8, cutmix=1.0, mixup_prob=0.8, label_smoothing=0.1)
    kinds = set()
    for step in range(40):
        images = torch.randn(B, 3, height, width)
        labels = torch.randint(0, C, (B,))
        extra = torch.softmax(torch.randn(B, C), 1)
        lam, box, perm = mixup.draw((2, step, 0), height, width, B)
        kinds.add("none" if perm is None else "mixup" if box is None else "cutmix")
        got = mixup(images, labels, key=(2, step, 0), extra=extra)
        expected = _sliced_mix(mixup, images, labels, (2, step, 0), extra)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)
    assert kinds == {"none", "mixup", "cutmix"}
