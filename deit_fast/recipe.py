"""What a config means for the data and the teacher cache, shared by `run` and
`cache_teacher` (which both import it, and not each other): the device, the dataset root,
the augmentation plan, the views' decoder, V and the cache identity."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deit_fast.config import Config
from deit_fast.models import MODEL_SPECS

if TYPE_CHECKING:
    from deit_fast.data_pipeline import DatasetIndex, PlanParams


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=auto")
    return torch.device(name)


def data_root(cfg: Config) -> Path:
    if not cfg.data.path:
        raise ValueError("data.path: no dataset given; pass data.path=/path/to/imagenet "
                         "(a folder with train/ and val/)")
    root = Path(cfg.data.path)
    if not root.is_dir():
        raise FileNotFoundError(f"data.path {str(root)!r} does not exist")
    return root


def image_size(cfg: Config) -> int:
    return cfg.model.img_size or MODEL_SPECS[cfg.model.name].get("img_size", 224)


def plan_params(cfg: Config) -> PlanParams:
    """The augmentation plan's parameters: shared by training and the teacher cache."""
    from deit_fast.data_pipeline import PlanParams

    d = cfg.data
    return PlanParams(image_size=image_size(cfg), scale=d.scale, ratio=d.ratio, hflip=d.hflip,
                      rand_augment=d.rand_augment or None, reprob=d.reprob)


def views_backend(cfg: Config, device: torch.device) -> str:
    """The decoder that renders the views: torch (PIL), dali-cpu or dali-gpu. Decoders
    differ by a few pixel levels, so a cache records the one its views came from."""
    if cfg.data.backend == "torch":
        return "torch"
    return "dali-gpu" if device.type == "cuda" else "dali-cpu"


def num_views(cfg: Config) -> int:
    """V, the one rule: distill.num_views, or one view per showing of the planned run."""
    from deit_fast.data_pipeline.sampler import full_views

    return cfg.distill.num_views or full_views(cfg.train.epochs, cfg.data.repeats)


def cache_header(cfg: Config, index: DatasetIndex, teacher_sha256: str, device: torch.device,
                 forwards: int = 0) -> dict[str, Any]:
    """The manifest identity of the cache this config asks for."""
    from deit_fast.data_pipeline.teacher_cache import manifest_header

    d = cfg.distill
    return manifest_header(
        dataset_fingerprint=index.fingerprint, num_samples=len(index), seed=cfg.train.seed,
        plan=dataclasses.asdict(plan_params(cfg)), repeats=cfg.data.repeats,
        num_classes=len(index.classes), teacher=d.teacher or "",
        teacher_checkpoint_sha256=teacher_sha256, num_views=num_views(cfg), topk=d.topk,
        epochs=cfg.train.epochs, views_backend=views_backend(cfg, device),
        shard_size=d.shard_size, forwards=forwards)
