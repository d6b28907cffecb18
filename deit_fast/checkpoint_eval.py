"""`deit-fast eval`: a checkpoint's top-1 on data.path/val, measured as its training run
measured it.

A deit-fast checkpoint carries its run's config and class names: its model, image size,
precision, crop, backend and eval batch are used unless a dotted override sets them
(`--config`, a shipped recipe's name or a file, supplies everything else), and its classes
are matched to val/'s folders by name: a val/ with fewer classes is evaluated on the
classes it has, one with a class the model never learnt is refused, naming it. A timm or
official DeiT checkpoint has neither: model.name says what it is (a wrong one is refused
with the registered models it would fit), and val/ must have as many classes as its head.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from typing import Any

import torch

from deit_fast import checkpoint
from deit_fast.config import Config, ConfigError, load_config
from deit_fast.ops import autocast
from deit_fast.resolve import data_root, resolve_device, val_loading
from deit_fast.run import build_model

# What a deit-fast checkpoint's own config decides for its evaluation, unless overridden.
EVAL_FROM_CHECKPOINT = ("model.name", "model.img_size", "model.num_classes", "train.precision",
                        "data.crop_pct", "data.backend", "data.eval_batch_size")


def eval_config(config_file: str | None, overrides: list[str], state: dict[str, Any]) -> Config:
    """The config to evaluate a checkpoint with: EVAL_FROM_CHECKPOINT keys from the
    checkpoint's own config (a deit-fast checkpoint has one) unless an override sets them,
    then the recipe (`--config`) for the rest. Its model.init_checkpoint is dropped: the
    evaluated checkpoint's weights replace every tensor."""
    explicit = {text.partition("=")[0].strip() for text in overrides}
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    taken = [f"{key}={json.dumps(saved[section][name])}" for key in EVAL_FROM_CHECKPOINT
             for section, name in [key.split(".")]
             if key not in explicit and name in saved.get(section, {})]
    cfg = load_config(config_file, [*taken, *overrides])
    return replace(cfg, model=replace(cfg.model, init_checkpoint=None))


def _labels_into(classes: list[str] | None, found: list[str], root: str, head_rows: int | None
                 ) -> torch.Tensor | None:
    """The checkpoint's label of each val/ class (None: the same labels), or ValueError
    naming what val/ has that the model cannot be scored on."""
    from deit_fast.data_pipeline.dataset import class_difference

    if classes is None:  # no names: as many classes as the head, in val/'s sorted order
        if head_rows is not None and head_rows != len(found):
            raise ValueError(f"data.path {root}: val/ has {len(found)} class folders, the "
                             f"checkpoint's head {head_rows} classes, and the checkpoint does "
                             "not say which: evaluate on a val/ with the classes it was "
                             "trained on")
        return None
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise ValueError(f"data.path {root}: val/ has classes the checkpoint's model was not "
                         "trained on: " + class_difference(classes, found, "the checkpoint",
                                                           "val/"))
    if found == classes:
        return None
    print(f"deit-fast eval: val/ has {len(found)} of the checkpoint's {len(classes)} classes "
          "(" + class_difference(classes, found, "the checkpoint", "val/") + "); its images "
          "are scored against all of the model's classes", file=sys.stderr)
    return torch.tensor([classes.index(c) for c in found])


def evaluate_checkpoint(config_file: str | None, overrides: list[str], checkpoint_path: str,
                        ema: bool = False, head: str = "joint") -> dict[str, float]:
    """Top-1/top-5 of a checkpoint (deit-fast, timm or official DeiT) on data.path/val, as
    the module docstring says; ema: the EMA weights of a deit-fast checkpoint; head: a
    distilled DeiT's class or distillation head instead of both (joint)."""
    from deit_fast.data_pipeline import DatasetIndex, build_val_loader
    from deit_fast.evaluate import evaluate
    from deit_fast.models import CheckpointMismatch, load_checkpoint, read_state_dict

    try:
        state = checkpoint.load(checkpoint_path)
    except ValueError as err:
        raise CheckpointMismatch(str(err)) from err
    cfg = eval_config(config_file, overrides, state)
    if ema and not isinstance(state.get("ema"), dict):
        raise ConfigError(f"--ema: checkpoint {checkpoint_path!r} holds no EMA weights (only "
                          "deit-fast checkpoints of runs with train.ema=true do)")
    weights = state["ema"] if ema else read_state_dict(state)
    root = data_root(cfg)
    val_index = DatasetIndex.from_folder(str(root), split="val")
    classes = state.get("classes")
    head_rows = weights["head.weight"].shape[0] if "head.weight" in weights else None
    device = resolve_device(cfg.train.device)
    model = build_model(cfg, len(classes) if classes else cfg.model.num_classes or head_rows
                        or len(val_index.classes), device)
    try:  # the architecture first: a checkpoint of another model is named as such
        load_checkpoint(model, weights)
    except CheckpointMismatch as err:
        raise CheckpointMismatch(f"{err}{_fitting_hint(weights, cfg)}") from err
    relabel = _labels_into(classes, val_index.classes, str(root), head_rows)
    if head != "joint":
        if not getattr(model, "distilled", False):
            raise ConfigError(f"--head {head}: model {cfg.model.name} has one head; --head "
                              "picks a head of a model with a distillation token")
        model.eval_head = head
    loader = build_val_loader(val_index, **val_loading(cfg, device))
    if relabel is not None:
        relabel = relabel.to(device)
        loader = ((images, relabel[labels]) for images, labels in loader)
    return evaluate(model, loader, device, lambda: autocast(device, cfg.train.precision))


def _fitting_hint(weights: dict[str, torch.Tensor], cfg: Config) -> str:
    """For a checkpoint that does not fit model.name: the registered DeiTs it would fit."""
    from deit_fast.models import models_fitting

    names = models_fitting(weights)
    if not names or cfg.model.name in names:
        return ""
    return (f". The checkpoint fits model.name={' or '.join(names)} (eval reads model.name "
            "from a deit-fast checkpoint; a timm or DeiT state dict needs it given)")


__all__ = ["EVAL_FROM_CHECKPOINT", "eval_config", "evaluate_checkpoint"]
