"""Model registry, and loading of timm / official DeiT / deit-fast checkpoints.

`model.name` is one of deit-fast's DeiTs (MODEL_SPECS: the Triton kernels back them) or any
timm model (a convnet teacher trained on one's own classes, a baseline), built by timm.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def is_known_model(name: str) -> bool:
    """A DeiT of MODEL_SPECS or a model timm can build."""
    if name in MODEL_SPECS:
        return True
    import timm

    return timm.is_model(name)


def model_image_size(name: str) -> int:
    """The resolution a model is built for: its spec's, or its timm pretrained
    configuration's (read from timm's registry, the one create_model attaches; nothing is
    built)."""
    if name in MODEL_SPECS:
        return MODEL_SPECS[name].get("img_size", 224)
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(name).input_size[-1]


def create_model(name: str, kernels: KernelChoice | None = None, **overrides: Any) -> nn.Module:
    """Build a registered DeiT (overrides: img_size, num_classes, drop_path_rate, depth...
    win) or a timm model (img_size, num_classes, drop_path_rate; a convnet takes any image
    size and no img_size argument)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if name not in MODEL_SPECS:
        return _create_timm(name, **overrides)
    model = DeiT(**{**MODEL_SPECS[name], **overrides})
    model.set_kernels(kernels or KernelChoice())
    return model


def _create_timm(name: str, img_size: int | None = None, **kwargs: Any) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(MODEL_SPECS)}, or a "
                         "timm model name (timm.list_models())")
    if img_size is not None:
        try:
            return timm.create_model(name, pretrained=False, img_size=img_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    return timm.create_model(name, pretrained=False, **kwargs)


def models_fitting(state: dict[str, Tensor]) -> list[str]:
    """The registered DeiTs whose tensors have the names and shapes of `state` (a resizable
    pos_embed aside), checked on the meta device: nothing is allocated."""
    classes = state["head.weight"].shape[0] if "head.weight" in state else 1000
    fitting = []
    for name in MODEL_SPECS:
        with torch.device("meta"):
            own = create_model(name, num_classes=classes).state_dict()
        if set(own) == set(state) and all(
                key == "pos_embed" or own[key].shape == state[key].shape for key in own):
            fitting.append(name)
    return fitting


def classifier_keys(model: nn.Module) -> tuple[str, ...]:
    """The modules whose tensors are the class heads: a DeiT's, or timm's `classifier`."""
    if isinstance(model, DeiT):
        return ("head", "head_dist")
    names = getattr(model, "pretrained_cfg", {}).get("classifier", ())
    return (names,) if isinstance(names, str) else tuple(names)


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


def load_checkpoint(model: nn.Module, source: str | Path | dict[str, Any],
                    new_head: bool = False, fresh_head: str | None = None) -> None:
    """Load a timm / official DeiT / deit-fast state dict (raw or under "model") into `model`
    (a deit-fast DeiT or a timm model).

    The architecture is checked first: the first tensor, in the model's order, that is
    missing or of another shape (a DeiT's pos_embed aside), then any unexpected tensor (a
    distillation token the model lacks), raises CheckpointMismatch naming it. Only then is a
    DeiT's pos_embed resized bicubically to the model's resolution. With new_head=True,
    class heads of another size are left at their fresh initialisation (fine-tuning to new
    classes), and a warning says so; `fresh_head`, a reason, leaves them fresh whatever their
    size (classes of other names).
    """
    state = read_state_dict(source)
    own = model.state_dict()
    where = f"{type(model).__name__}"
    resizable = {"pos_embed"} if isinstance(model, DeiT) else set()
    fresh = []
    for key, value in own.items():
        if key not in state:
            raise CheckpointMismatch(f"checkpoint does not fit {where}: tensor {key!r} "
                                     f"{tuple(value.shape)} is missing (another architecture?)")
        is_head = key.rsplit(".", 1)[0] in classifier_keys(model)
        if is_head and fresh_head:
            state[key] = value
            fresh.append(key)
        elif key not in resizable and state[key].shape != value.shape:
            if new_head and is_head:
                state[key] = value
                fresh.append(key)
                continue
            raise CheckpointMismatch(f"checkpoint does not fit {where}: tensor {key!r} has shape "
                                     f"{tuple(state[key].shape)}, the model expects "
                                     f"{tuple(value.shape)}")
    extra = sorted(set(state) - set(own))
    if extra:
        raise CheckpointMismatch(f"checkpoint does not fit {where}: unexpected tensor "
                                 f"{extra[0]!r} {tuple(state[extra[0]].shape)} (another "
                                 "architecture?)")
    if fresh:
        why = fresh_head or "another number of classes than this run's"
        warnings.warn(f"model.init_checkpoint: the class head ({', '.join(fresh)}) starts from "
                      f"a fresh initialisation: the checkpoint's has {why}", stacklevel=2)
    if resizable:
        theirs, wanted = state["pos_embed"], own["pos_embed"]
        if theirs.shape != wanted.shape:
            if theirs.shape[-1] != wanted.shape[-1]:
                raise CheckpointMismatch(f"checkpoint does not fit: tensor 'pos_embed' has "
                                         f"shape {tuple(theirs.shape)}, the model expects "
                                         f"{tuple(wanted.shape)}")
            state["pos_embed"] = interpolate_pos_embed(theirs, model.num_prefix_tokens,
                                                       model.grid)
    model.load_state_dict(state, strict=True)


__all__ = ["MODEL_SPECS", "CheckpointMismatch", "DeiT", "classifier_keys", "create_model",
           "interpolate_pos_embed", "is_known_model", "load_checkpoint", "model_image_size",
           "models_fitting", "read_state_dict"]
