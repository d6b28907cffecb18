"""Mixup / CutMix on the training device, with timm's batch-mode semantics.

Per batch: with probability `prob`, mix sample i with sample B - 1 - i (the batch
flipped, as timm's batch mode and so the official DeiT code pair them), by Mixup
(lambda ~ Beta(mixup_alpha)) or CutMix (lambda ~ Beta(cutmix_alpha), timm's rand_bbox of
area 1 - lambda, lambda corrected to the clipped box), switching with `switch_prob` when
both are on. Lambda and box come from the key ((epoch, step, rank): each rank draws its
own, as timm's per-process Mixup does), never from a global RNG; they are drawn on the
host, so no device sync. tests/test_timm_parity.py checks images and targets against
timm's Mixup on the same draw. Labels become label-smoothed one-hot targets mixed with
the same lambda and pairing (`mix_targets`, which also mixes a views cache's teacher
outputs: deit_fast.teacher).

On the device every batch runs the same ops on the same shapes, whatever was drawn: the
draw becomes two small tensors (`params`), and `apply` blends each pixel with its partner
by a per-pixel weight, lambda everywhere for Mixup, 0 inside the box and 1 outside for
CutMix, 1 for a batch left unmixed (paired with itself). Nothing depends on the
drawn values through a shape or a host read, so the step can be captured in a CUDA graph.
"""

from __future__ import annotations

import numpy as np
import torch

from .keyed_random import Domain, generator


def cutmix_box(lam: float, centre: tuple[int, int], height: int, width: int
               ) -> tuple[int, int, int, int]:
    """timm's rand_bbox: a box of sides sqrt(1 - lam) of the image's about `centre` (row,
    column), clipped to the image; (top, bottom, left, right). An odd side keeps its extra
    pixel below and to the right, as timm 1.0 does (older timm dropped it)."""
    cut_h, cut_w = int(height * np.sqrt(1 - lam)), int(width * np.sqrt(1 - lam))
    cy, cx = centre
    return (max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height),
            max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width))


class Mixup:
    """`mixup(images, labels, key)` -> (images, targets), on the device. The recipe's values
    are the config's (deit_fast.resolve.build_mixup)."""

    def __init__(
        self,
        mixup_alpha: float,
        cutmix_alpha: float,
        prob: float,
        switch_prob: float,
        label_smoothing: float,
        num_classes: int,
        seed: int = 0,
    ) -> None:
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob
        self.label_smoothing, self.num_classes, self.seed = label_smoothing, num_classes, seed

    def draw(self, key: tuple[int, int, int], height: int, width: int, batch_size: int):
        """(lambda, box (top, bottom, left, right) or None, pairing or None) of the batch
        at key (epoch, step, rank); the pairing is the flip, None for an unmixed batch."""
        g = generator(Domain.MIXUP, self.seed, *key)
        if not self.enabled or g.random() >= self.prob:
            return 1.0, None, None
        use_cutmix = self.cutmix_alpha > 0 and (
            self.mixup_alpha <= 0 or g.random() < self.switch_prob
        )
        lam = float(g.beta(*(2 * [self.cutmix_alpha if use_cutmix else self.mixup_alpha])))
        box = None
        if use_cutmix:
            centre = int(g.integers(0, height)), int(g.integers(0, width))
            box = cutmix_box(lam, centre, height, width)
            top, bottom, left, right = box
            lam = 1 - (bottom - top) * (right - left) / (height * width)  # timm's correct_lam
        return lam, box, np.arange(batch_size)[::-1].copy()

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def params(self, key: tuple[int, ...], height: int, width: int,
               batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The draw as host tensors: the pairing (int64), and float32 (top, bottom,
        left, right, pixel weight inside the box, outside it, label lambda)."""
        lam, box, perm = self.draw(key, height, width, batch_size)
        if perm is None:
            perm, weights = np.arange(batch_size), (0, 0, 0, 0, 1.0, 1.0, 1.0)
        elif box is None:
            weights = (0, 0, 0, 0, lam, lam, lam)
        else:
            weights = (*box, 0.0, 1.0, lam)
        return torch.from_numpy(perm), torch.tensor(weights, dtype=torch.float32)

    def smooth_one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        off = self.label_smoothing / self.num_classes
        targets = torch.full((len(labels), self.num_classes), off, device=labels.device)
        return targets.scatter_(1, labels.view(-1, 1), 1 - self.label_smoothing + off)

    def device_params(self, key: tuple[int, int, int], images: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """`params` of the batch `images`, copied to its device without a wait."""
        perm, weights = self.params(key, images.shape[-2], images.shape[-1], len(images))
        if images.is_cuda:  # pinned (from torch's caching host allocator): a truly async copy
            perm, weights = perm.pin_memory(), weights.pin_memory()
        return (perm.to(images.device, non_blocking=True),
                weights.to(images.device, non_blocking=True))

    def mix_images(self, images: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor
                   ) -> torch.Tensor:
        """The images mixed by `params` already on the device: fixed shapes, no host read."""
        if not self.enabled:
            return images
        height, width = images.shape[-2:]
        top, bottom, left, right, inside, outside, _ = weights.unbind()
        rows = torch.arange(height, device=images.device, dtype=weights.dtype)
        cols = torch.arange(width, device=images.device, dtype=weights.dtype)
        in_box = ((rows >= top) & (rows < bottom))[:, None] & ((cols >= left) & (cols < right))
        pixel = torch.where(in_box, inside, outside).to(images.dtype)
        return torch.lerp(images[perm], images, pixel)

    def apply(self, images: torch.Tensor, labels: torch.Tensor, perm: torch.Tensor,
              weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed images, mixed label-smoothed targets) by `params` already on the device."""
        return (self.mix_images(images, perm, weights),
                mix_targets(self.smooth_one_hot(labels), perm, weights))

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, key: tuple[int, int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(images, labels, *self.device_params(key, images))


def mix_targets(targets: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor
                ) -> torch.Tensor:
    """Per-sample distributions (labels, a views cache's teacher outputs) mixed with the
    draw's label lambda and pairing."""
    return torch.lerp(targets[perm], targets, weights[6].to(targets.dtype))
