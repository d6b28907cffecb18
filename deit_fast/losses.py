"""Training losses: soft-target cross-entropy, and DeiT's distillation objective.

The definitions follow the official DeiT code: soft distillation is the KL divergence at
temperature tau, scaled by tau^2 and divided by the number of logits; hard distillation
is the cross-entropy with the teacher's argmax. Both apply to the distillation head of a
distilled model, or to the class head when the model has no distillation token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against a distribution per row (mixup / label smoothing targets)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class DistillationLoss:
    """(1 - alpha) * CE(class head, targets) + alpha * distillation(dist head, teacher)."""

    def __init__(self, kind: str = "none", alpha: float = 0.5, tau: float = 1.0,
                 teacher: Callable[[Tensor], Tensor] | None = None) -> None:
        if kind not in ("none", "soft", "hard"):
            raise ValueError(f"distill.type: {kind!r} is not one of none, soft, hard")
        if kind != "none" and teacher is None:
            raise ValueError(f"distill.type={kind!r} needs a teacher")
        self.kind, self.alpha, self.tau, self.teacher = kind, alpha, tau, teacher

    def __call__(self, images: Tensor, outputs: Tensor | tuple[Tensor, Tensor],
                 targets: Tensor, teacher_targets: Tensor | None = None) -> Tensor:
        """teacher_targets: per-sample targets from a cache (not used by the online teacher)."""
        logits, dist_logits = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        base = soft_target_cross_entropy(logits, targets)
        if self.kind == "none":
            return base
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        dist_logits = dist_logits.float()
        if self.kind == "soft":
            t = self.tau
            kl = F.kl_div(F.log_softmax(dist_logits / t, dim=-1),
                          F.log_softmax(teacher_logits / t, dim=-1),
                          reduction="sum", log_target=True)
            distill = kl * (t * t) / dist_logits.numel()
        else:
            distill = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))
        return base * (1 - self.alpha) + distill * self.alpha
