"""Mixup / CutMix: targets and images against hand computations (timm's own: test_timm_parity)."""

import numpy as np
import pytest
import torch

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
    lam, box, pairing = mixup.draw((4, 17, 0), S, S, B)
    assert box is None and 0 < lam < 1 and pairing.tolist() == list(range(B))[::-1]
    mixed, targets = mixup(images, labels, key=(4, 17, 0))
    for i in range(B):
        j = int(pairing[i])
        assert torch.allclose(mixed[i], torch.full((3, S, S), lam * i + (1 - lam) * j))
        expected = (
            lam * _one_hot(labels[i : i + 1], 0.1)[0]
            + (1 - lam) * _one_hot(labels[j : j + 1], 0.1)[0]
        )
        torch.testing.assert_close(targets[i], expected)
    assert torch.equal(images[:, 0, 0, 0], torch.arange(B, dtype=torch.float32))  # input intact


def test_cutmix_box_area_sets_lambda():
    images, labels = _constant_batch()
    mixup = recipe_mixup(C, seed=0, mixup=0.0, cutmix=1.0, label_smoothing=0.0)
    for step in range(20):
        mixed, targets = mixup(images, labels, key=(0, step, 0))
        lam, (top, bottom, left, right), pairing = mixup.draw((0, step, 0), S, S, B)
        for i in range(B):
            from_other = (mixed[i] != i).float().mean().item()
            area = (bottom - top) * (right - left) / S**2
            assert from_other == pytest.approx(area)
            assert lam == pytest.approx(1 - area)
            expected = (
                lam * _one_hot(labels[i : i + 1], 0)[0]
                + (1 - lam) * _one_hot(labels[pairing[i] : pairing[i] + 1], 0)[0]
            )
            torch.testing.assert_close(targets[i], expected)


def test_off_gives_smoothed_one_hot_only():
    images, labels = _constant_batch()
    for mixup in (
        recipe_mixup(C, mixup=0, cutmix=0),
        recipe_mixup(C, mixup_prob=0),
    ):
        out, targets = mixup(images, labels, key=(1, 2, 0))
        assert torch.equal(out, images)  # prob=0 still runs the blend, at 1
        torch.testing.assert_close(targets, _one_hot(labels, 0.1))


def test_draws_are_keyed_and_follow_the_recipe_rates():
    mixup = recipe_mixup(C, mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5)
    draws = [mixup.draw((0, step, 0), 224, 224, 4) for step in range(2000)]
    again = mixup.draw((0, 5, 0), 224, 224, 4)
    assert again[0] == draws[5][0] and again[1] == draws[5][1]
    cutmix = np.mean([box is not None for _, box, _ in draws])
    assert abs(cutmix - 0.5) < 0.05
    lams = np.array([lam for lam, box, _ in draws if box is None])
    assert (
        abs(lams.mean() - 0.5) < 0.03 and abs(lams.var() - 0.64 / (1.6**2 * 2.6)) < 0.01
    )  # Beta(0.8, 0.8)
    sometimes = recipe_mixup(C, mixup_prob=0.3)
    applied = np.mean([sometimes.draw((1, s, 0), 8, 8, 4)[2] is not None for s in range(2000)])
    assert abs(applied - 0.3) < 0.04


def _sliced_mix(mixup, images, labels, key):
    """The data-dependent-slice CutMix the fixed-shape one replaced: the reference."""
    targets = mixup.smooth_one_hot(labels)
    lam, box, pairing = mixup.draw(key, images.shape[-2], images.shape[-1], len(images))
    if pairing is None:
        return images, targets
    pairing = torch.from_numpy(pairing)
    if box is None:
        images = torch.lerp(images[pairing], images, lam)
    else:
        top, bottom, left, right = box
        images = images.clone()
        images[:, :, top:bottom, left:right] = images[pairing, :, top:bottom, left:right]
    return images, torch.lerp(targets[pairing], targets, lam)


@pytest.mark.parametrize("size", [(16, 16), (13, 7), (1, 1)])
def test_fixed_shape_mix_equals_the_sliced_one(size):
    """Every kind of batch (Mixup, CutMix, boxes at the borders, unmixed) on random images."""
    height, width = size
    mixup = recipe_mixup(C, seed=7, mixup=0.8, cutmix=1.0, mixup_prob=0.8, label_smoothing=0.1)
    kinds = set()
    for step in range(40):
        images = torch.randn(B, 3, height, width)
        labels = torch.randint(0, C, (B,))
        lam, box, pairing = mixup.draw((2, step, 0), height, width, B)
        kinds.add("none" if pairing is None else "mixup" if box is None else "cutmix")
        got = mixup(images, labels, key=(2, step, 0))
        expected = _sliced_mix(mixup, images, labels, (2, step, 0))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)
    assert kinds == {"none", "mixup", "cutmix"}
