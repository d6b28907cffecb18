"""The online teacher for distillation: a timm model or a deit-fast model, from a local file.

Nothing is downloaded: a checkpoint path is required, and a checkpoint that does not fit
the named architecture is refused with the first mismatching tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

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
