"""Mixup / CutMix on the training device, with timm's batch-mode semantics.

Per batch: with probability `prob`, mix with a random permutation of the batch, by Mixup
(lambda ~ Beta(mixup_alpha)) or CutMix (lambda ~ Beta(cutmix_alpha), a box of area
1 - lambda, lambda corrected to the clipped box), switching with `switch_prob` when both
are on. Lambda, box and permutation come from the key (e.g. (epoch, step), plus the rank
for per-rank draws), never from a global RNG; they are drawn on the host, so no device
sync. Labels become label-smoothed one-hot targets mixed with the same lambda and
permutation, and so does `extra` (teacher targets: teacher(mix(a, b)) is approximated by
mix(teacher(a), teacher(b))).
"""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.keyed_random import generator

_STREAM = 2  # keeps mixup draws apart from the plan and the sampler under the same seed


class Mixup:
    """`mixup(images, labels, key, extra)` -> (images, targets, extra), all on the device."""

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
        seed: int = 0,
    ) -> None:
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob
        self.label_smoothing, self.num_classes, self.seed = label_smoothing, num_classes, seed

    def draw(self, key: tuple[int, ...], height: int, width: int, batch_size: int):
        """(lambda, box (top, bottom, left, right) or None, permutation) of one batch."""
        g = generator(self.seed, _STREAM, *key)
        enabled = self.mixup_alpha > 0 or self.cutmix_alpha > 0
        if not enabled or g.random() >= self.prob:
            return 1.0, None, None
        use_cutmix = self.cutmix_alpha > 0 and (
            self.mixup_alpha <= 0 or g.random() < self.switch_prob
        )
        lam = float(g.beta(*(2 * [self.cutmix_alpha if use_cutmix else self.mixup_alpha])))
        box = None
        if use_cutmix:  # timm's rand_bbox with correct_lam=True
            cut_h, cut_w = int(height * np.sqrt(1 - lam)), int(width * np.sqrt(1 - lam))
            cy, cx = int(g.integers(0, height)), int(g.integers(0, width))
            top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
            left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
            box = (top, bottom, left, right)
            lam = 1 - (bottom - top) * (right - left) / (height * width)
        return lam, box, g.permutation(batch_size)

    def smooth_one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        off = self.label_smoothing / self.num_classes
        targets = torch.full((len(labels), self.num_classes), off, device=labels.device)
        return targets.scatter_(1, labels.view(-1, 1), 1 - self.label_smoothing + off)

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        key: tuple[int, ...],
        extra: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if extra is not None and not extra.is_floating_point():
            raise TypeError(
                f"extra must be a floating tensor (one-hot or probabilities), got {extra.dtype}"
            )
        targets = self.smooth_one_hot(labels)
        lam, box, perm = self.draw(key, images.shape[-2], images.shape[-1], len(images))
        if perm is None:
            return images, targets, extra
        perm = torch.from_numpy(perm).to(images.device, non_blocking=True)
        if box is None:
            images = torch.lerp(images[perm], images, lam)
        else:
            top, bottom, left, right = box
            images = images.clone()
            images[:, :, top:bottom, left:right] = images[perm, :, top:bottom, left:right]
        targets = torch.lerp(targets[perm], targets, lam)
        if extra is not None:
            extra = torch.lerp(extra[perm], extra, lam)
        return images, targets, extra
