"""`TrainBatch`: what a training loader yields, whichever backend made it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

HOST_FIELDS = ("samples", "repeats", "views")  # int64 [B] each
TEACHER_FIELDS = ("teacher_values", "teacher_indices")  # [B, k] each, with a teacher cache


@dataclass
class TrainBatch:
    """One rank's batch: what the step reads on the device, which image each row shows on
    the host (the step never reads it: no copy); views[i] is the plan view of samples[i].
    With a teacher cache, the teacher's top-k for each (view, requested sample) rides along."""

    images: torch.Tensor  # float32 [B, 3, S, S], normalized and erased
    labels: torch.Tensor  # int64 [B]
    samples: torch.Tensor  # int64 [B] host; dataset index shown (a replacement if unreadable)
    repeats: torch.Tensor  # int64 [B] host; repeat id k
    views: torch.Tensor  # int64 [B] host; the sampler's view rule (mod num_views with a cache)
    teacher_values: torch.Tensor | None = None  # float32 [B, k] top-k log-probabilities
    teacher_indices: torch.Tensor | None = None  # int64 [B, k] their classes
