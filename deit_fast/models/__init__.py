"""Model registry, and loading of timm / official DeiT / deit-fast checkpoints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deit_fast import checkpoint
from deit_fast.models.deit import DeiT
from deit_fast.ops import KernelChoice

_TINY = dict(embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)
_MICRO = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3)  # the digits demo

MODEL_SPECS: dict[str, dict[str, Any]] = {
    "deit_tiny_patch16_224": _TINY,
    "deit_small_patch16_224": _SMALL,
    "deit_base_patch16_224": _BASE,
    "deit_base_patch16_384": dict(_BASE, img_size=384),
    "deit_tiny_distilled_patch16_224": dict(_TINY, distilled=True),
    "deit_small_distilled_patch16_224": dict(_SMALL, distilled=True),
    "deit_base_distilled_patch16_224": dict(_BASE, distilled=True),
    "deit_base_distilled_patch16_384": dict(_BASE, img_size=384, distilled=True),
    "deit_micro_patch4_32": _MICRO,
    "deit_micro_distilled_patch4_32": dict(_MICRO, distilled=True),
}


class CheckpointMismatch(ValueError):
    """A checkpoint's tensors do not fit the model."""


def create_model(name: str, kernels: KernelChoice | None = None, **overrides: Any) -> DeiT:
    """Build a registered DeiT; overrides (img_size, num_classes, drop_path_rate, depth...) win."""
    if name not in MODEL_SPECS:
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(MODEL_SPECS)}")
    kwargs = dict(MODEL_SPECS[name])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    model = DeiT(**kwargs)
    model.set_kernels(kernels or KernelChoice())
    return model


def interpolate_pos_embed(pos_embed: Tensor, num_prefix_tokens: int, new_grid: int) -> Tensor:
    """Resize a [1, prefix + g*g, C] position embedding to new_grid (bicubic; prefix kept)."""
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = math.isqrt(grid_tokens.shape[1])
    if old_grid * old_grid != grid_tokens.shape[1]:
        raise CheckpointMismatch(f"pos_embed: {grid_tokens.shape[1]} patch tokens are not a "
                                 "square grid")
    if old_grid == new_grid:
        return pos_embed
    dim = grid_tokens.shape[-1]
    grid = grid_tokens.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def read_state_dict(source: str | Path | dict[str, Any]) -> dict[str, Tensor]:
    """The state dict in a file or dict: raw, or under "model"/"state_dict"; DDP's "module."
    prefix removed."""
    if isinstance(source, (str, Path)):
        try:
            source = checkpoint.load(source)
        except ValueError as err:
            raise CheckpointMismatch(str(err)) from err
    if not isinstance(source, dict):
        raise CheckpointMismatch(f"checkpoint holds a {type(source).__name__}, not a state dict")
    for key in ("model", "state_dict"):  # official DeiT and deit-fast store it under "model"
        if isinstance(source.get(key), dict):
            source = source[key]
            break
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in source.items()}


def load_checkpoint(model: DeiT, source: str | Path | dict[str, Any],
                    new_head: bool = False) -> None:
    """Load a timm / official DeiT / deit-fast state dict (raw or under "model") into `model`.

    The architecture is checked first: the first tensor, in the model's order, that is
    missing or of another shape (pos_embed aside), then any unexpected tensor (a
    distillation token the model lacks), raises CheckpointMismatch naming it. Only then is
    pos_embed resized bicubically to the model's resolution. With new_head=True, class
    heads of another size are left at their fresh initialisation (fine-tuning to new classes).
    """
    state = read_state_dict(source)
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            raise CheckpointMismatch(f"checkpoint does not fit {type(model).__name__}: tensor "
                                     f"{key!r} {tuple(value.shape)} is missing (another "
                                     "architecture?)")
        if key != "pos_embed" and state[key].shape != value.shape:
            if new_head and key.split(".")[0] in ("head", "head_dist"):
                state[key] = value
                continue
            raise CheckpointMismatch(f"checkpoint does not fit: tensor {key!r} has shape "
                                     f"{tuple(state[key].shape)}, the model expects "
                                     f"{tuple(value.shape)}")
    extra = sorted(set(state) - set(own))
    if extra:
        raise CheckpointMismatch(f"checkpoint does not fit: unexpected tensor {extra[0]!r} "
                                 f"{tuple(state[extra[0]].shape)} (another architecture?)")
    theirs, wanted = state["pos_embed"], own["pos_embed"]
    if theirs.shape != wanted.shape:
        if theirs.shape[-1] != wanted.shape[-1]:
            raise CheckpointMismatch(f"checkpoint does not fit: tensor 'pos_embed' has shape "
                                     f"{tuple(theirs.shape)}, the model expects "
                                     f"{tuple(wanted.shape)}")
        state["pos_embed"] = interpolate_pos_embed(theirs, model.num_prefix_tokens, model.grid)
    model.load_state_dict(state, strict=True)


__all__ = ["MODEL_SPECS", "CheckpointMismatch", "DeiT", "create_model", "interpolate_pos_embed",
           "load_checkpoint", "read_state_dict"]
