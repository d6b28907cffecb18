"""Training losses: soft-target cross-entropy, and DeiT's distillation objective.

The definitions follow the official DeiT code: soft distillation is the KL divergence at
temperature tau, scaled by tau^2 and divided by the number of logits; hard distillation
is the cross-entropy with the teacher's argmax. Both apply to the distillation head of a
distilled model, or to the class head when the model has no distillation token.

The loss receives the teacher's side as per-sample distributions (deit_fast.teacher's
TeacherTargets makes them, from the online teacher on the mixed batch or from the cache).
The one approximation of the cache, in one place: teacher(mix(a, b)) is taken as
mix(teacher(a), teacher(b)), so soft distillation uses the mixed distribution and hard
distillation its argmax (the class the mix is mostly made of).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DISTILL_TYPES = ("none", "soft", "hard")  # distill.type

def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against a distribution per row (mixup / label smoothing targets)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def soft_distillation(dist_logits: Tensor, teacher_probs: Tensor, tau: float) -> Tensor:
    """DeiT's soft loss: KL(teacher || student) at temperature tau, * tau^2 / numel."""
    kl = F.kl_div(F.log_softmax(dist_logits.float() / tau, dim=-1), teacher_probs,
                  reduction="sum")
    return kl * (tau * tau) / dist_logits.numel()


def hard_distillation(dist_logits: Tensor, teacher_scores: Tensor) -> Tensor:
    """DeiT's hard loss: cross-entropy with the teacher's argmax (logits or probabilities)."""
    return F.cross_entropy(dist_logits.float(), teacher_scores.argmax(dim=-1))


class DistillationLoss:
    """(1 - alpha) * CE(class head, targets) + alpha * distillation(dist head, teacher)."""

    def __init__(self, kind: str = "none", alpha: float = 0.5, tau: float = 1.0) -> None:
        if kind not in DISTILL_TYPES:
            raise ValueError(f"distill.type: {kind!r} is not one of {', '.join(DISTILL_TYPES)}")
        self.kind, self.alpha, self.tau = kind, alpha, tau

    def components(self, outputs: Tensor | tuple[Tensor, Tensor], targets: Tensor,
                   teacher_targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(class-head loss, distillation loss or None when distill.type is none)."""
        logits, dist_logits = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        base = soft_target_cross_entropy(logits, targets)
        if self.kind == "none":
            return base, None
        if teacher_targets is None:
            raise ValueError(f"distill.type={self.kind!r} needs teacher targets: set "
                             "distill.teacher (online) or distill.cache_dir (cache)")
        if self.kind == "soft":
            return base, soft_distillation(dist_logits, teacher_targets.float(), self.tau)
        return base, hard_distillation(dist_logits, teacher_targets)

    def __call__(self, outputs: Tensor | tuple[Tensor, Tensor], targets: Tensor,
                 teacher_targets: Tensor | None = None) -> Tensor:
        """teacher_targets: per-sample teacher distributions of the (mixed) batch."""
        base, distill = self.components(outputs, targets, teacher_targets)
        if distill is None:
            return base
        return base * (1 - self.alpha) + distill * self.alpha
