"""The teacher's side of distillation: the teacher model, and the targets it gives a batch.

`load_teacher` builds a timm or deit-fast model from a local file (nothing is downloaded;
a checkpoint that does not fit the architecture is refused with the first mismatching
tensor). `TeacherTargets` is the one place teacher targets come from, for both sources:
cached, the top-k the loader attached to the batch, rebuilt to a distribution before
mixup (and mixed like the labels); online, the teacher run on the mixed images, as the
paper does. Both are the teacher's distribution at `target_tau` (tau for soft
distillation; hard takes the argmax, at 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deit_fast.data_pipeline.teacher_cache import rebuild_distribution
from deit_fast.models import (
    MODEL_SPECS,
    CheckpointMismatch,
    create_model,
    load_checkpoint,
    read_state_dict,
)


def load_teacher(name: str, checkpoint_path: str | None, num_classes: int,
                 device: torch.device) -> nn.Module:
    if not checkpoint_path:
        raise ValueError(f"distill.teacher_checkpoint: a local checkpoint for teacher {name!r} is "
                         "required (deit-fast never downloads weights)")
    if not Path(checkpoint_path).is_file():
        raise FileNotFoundError(f"distill.teacher_checkpoint {checkpoint_path!r} does not exist")
    if name in MODEL_SPECS:
        model = create_model(name, num_classes=num_classes)
        load_checkpoint(model, checkpoint_path)
    else:
        import timm

        try:
            model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        except RuntimeError as err:
            raise ValueError(f"distill.teacher: unknown model {name!r} ({err})") from err
        state = read_state_dict(checkpoint_path)
        own = model.state_dict()
        for key, value in own.items():
            if key not in state or state[key].shape != value.shape:
                found = tuple(state[key].shape) if key in state else "missing"
                raise CheckpointMismatch(f"teacher checkpoint {checkpoint_path!r} does not fit "
                                         f"{name}: tensor {key!r} expected {tuple(value.shape)},"
                                         f" found {found}")
        model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model.to(device)


class TeacherTargets:
    """Per-sample teacher distributions for the loss, from the cache or an online teacher."""

    def __init__(self, kind: str, tau: float, num_classes: int,
                 teacher: nn.Module | None = None) -> None:
        self.kind, self.tau, self.num_classes, self.teacher = kind, tau, num_classes, teacher

    @property
    def target_tau(self) -> float:
        """The temperature of the targets: the loss's tau for soft, 1 for hard."""
        return self.tau if self.kind == "soft" else 1.0

    def from_batch(self, batch: Any) -> Tensor | None:
        """Cached source: the distribution rebuilt from the batch's top-k (mix it next)."""
        if self.teacher is not None:
            return None
        if getattr(batch, "teacher_values", None) is None:
            raise ValueError("distill.source=cache, but the batch carries no teacher top-k: "
                             "build the train loader with the teacher cache")
        return rebuild_distribution(batch.teacher_values, batch.teacher_indices,
                                    self.num_classes, self.target_tau)

    def __call__(self, images: Tensor, mixed: Tensor | None) -> Tensor:
        """The targets of the mixed batch: the mixed cached ones, or the teacher on images."""
        if mixed is not None:
            return mixed
        with torch.no_grad():
            return torch.softmax(self.teacher(images).float() / self.target_tau, dim=-1)
