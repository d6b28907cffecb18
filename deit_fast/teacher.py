"""The teacher's side of distillation: the teacher model, and the targets it gives a batch.

`load_teacher` builds a timm or deit-fast model from a local file (nothing is downloaded;
a checkpoint that does not fit the architecture is refused with the first mismatching
tensor, naming the keys that chose them). `TeacherTargets` is the one path teacher
targets take, from every source, to the teacher's distribution on the mixed batch at
`target_tau` (tau for soft distillation; hard takes the argmax, at 1): online, the teacher
run on the mixed images, as the paper does; a batches cache, the top-k the loader attached
to the batch, which the cache pass computed on these same mixed images; a views cache, the
top-k of each unmixed view, mixed like the labels (mix(teacher(a), teacher(b)) for
teacher(mix(a, b)), the one approximation, named in the README).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deit_fast.data_pipeline.mixup import mix_targets
from deit_fast.data_pipeline.teacher_cache import rebuild_distribution
from deit_fast.models import CheckpointMismatch, create_model, load_checkpoint


def load_teacher(name: str, checkpoint_path: str | None, num_classes: int,
                 device: torch.device, img_size: int | None = None) -> nn.Module:
    """distill.teacher (a deit-fast DeiT or any timm model) with the weights of
    distill.teacher_checkpoint, for images of img_size, in eval mode."""
    if not checkpoint_path:
        raise ValueError(f"distill.teacher_checkpoint: a local checkpoint for teacher {name!r} is "
                         "required (deit-fast never downloads weights)")
    if not Path(checkpoint_path).is_file():
        raise FileNotFoundError(f"distill.teacher_checkpoint {checkpoint_path!r} does not exist")
    try:
        model = create_model(name, num_classes=num_classes, img_size=img_size)
    except ValueError as err:
        raise ValueError(f"distill.teacher: {err}") from err
    try:
        load_checkpoint(model, checkpoint_path)
    except CheckpointMismatch as err:
        raise CheckpointMismatch(f"distill.teacher_checkpoint {checkpoint_path!r} is not a "
                                 f"{name} of {num_classes} classes (distill.teacher): {err}"
                                 ) from err
    model.eval().requires_grad_(False)
    return model.to(device)


class TeacherTargets:
    """Per-sample teacher distributions of the mixed batch, from an online teacher or a
    cache of either mode (cache_mode: "batches" or "views")."""

    def __init__(self, kind: str, tau: float, num_classes: int,
                 teacher: nn.Module | None = None, cache_mode: str | None = None) -> None:
        if (teacher is None) == (cache_mode is None):
            raise ValueError("TeacherTargets takes an online teacher or a cache mode, one")
        self.kind, self.tau, self.num_classes = kind, tau, num_classes
        self.teacher, self.cache_mode = teacher, cache_mode

    @property
    def target_tau(self) -> float:
        """The temperature of the targets: the loss's tau for soft, 1 for hard."""
        return self.tau if self.kind == "soft" else 1.0

    def __call__(self, batch: Any, images: Tensor, perm: Tensor, weights: Tensor) -> Tensor:
        """The targets of the batch mixed into `images` by the draw (perm, weights)."""
        if self.teacher is not None:
            with torch.no_grad():
                return torch.softmax(self.teacher(images).float() / self.target_tau, dim=-1)
        if getattr(batch, "teacher_values", None) is None:
            raise ValueError("distill.source=cache, but the batch carries no teacher top-k: "
                             "build the train loader with the teacher cache")
        cached = rebuild_distribution(batch.teacher_values, batch.teacher_indices,
                                      self.num_classes, self.target_tau)
        return cached if self.cache_mode == "batches" else mix_targets(cached, perm, weights)
