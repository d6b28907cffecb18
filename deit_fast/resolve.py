"""What a config resolves to, shared by `run`, `cache_teacher` (which do not import each
other) and `checkpoint_eval`: the device, the dataset root, the image size, the
augmentation plan, Mixup, the views' decoder, V, and the teacher cache's identity and
geometry.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deit_fast.config import Config, DataConfig
from deit_fast.models import model_image_size

if TYPE_CHECKING:
    from deit_fast.data_pipeline import DatasetIndex, Mixup, PlanParams


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
    return cfg.model.img_size or model_image_size(cfg.model.name)


def plan_params(cfg: Config) -> PlanParams:
    """The augmentation plan's parameters: shared by training and the teacher cache."""
    from deit_fast.data_pipeline import PlanParams

    d = cfg.data
    return PlanParams(image_size=image_size(cfg), scale=d.scale, ratio=d.ratio, hflip=d.hflip,
                      rand_augment=d.rand_augment or None, reprob=d.reprob)


def build_mixup(d: DataConfig, num_classes: int, seed: int = 0) -> Mixup:
    """Mixup/CutMix and label smoothing as the data config says: training's and the teacher
    cache pass's."""
    from deit_fast.data_pipeline import Mixup

    return Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, prob=d.mixup_prob,
                 switch_prob=d.mixup_switch_prob, label_smoothing=d.label_smoothing,
                 num_classes=num_classes, seed=seed)


def data_backend(cfg: Config, device: torch.device) -> str:
    """data.backend with auto resolved: DALI where it decodes on a GPU and is installed, the
    torch loader elsewhere (DALI's CPU graph is slower: benchmarks/results/data_cpu.md)."""
    if cfg.data.backend != "auto":
        return cfg.data.backend
    on_gpu = device.type == "cuda" and importlib.util.find_spec("nvidia.dali") is not None
    return "dali" if on_gpu else "torch"


def num_workers(cfg: Config) -> int:
    """data.num_workers, or min(8, the CPU cores this process may use / ranks on the node)."""
    if cfg.data.num_workers is not None:
        return cfg.data.num_workers
    share = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return min(8, max(1, share))


def loading(cfg: Config, device: torch.device) -> dict[str, Any]:
    """How the config asks data to be read (workers, backend, bad-image policy): arguments of
    data_pipeline's loaders, which declare no defaults of their own."""
    return {"num_workers": num_workers(cfg), "backend": data_backend(cfg, device),
            "on_bad_image": cfg.data.on_bad_image, "device": device}


def train_loading(cfg: Config, device: torch.device) -> dict[str, Any]:
    """build_train_loader's arguments from the config (all but the index and its rank)."""
    return {"params": plan_params(cfg), "batch_size": cfg.data.batch_size,
            "seed": cfg.train.seed, "repeats": cfg.data.repeats, **loading(cfg, device)}


def val_loading(cfg: Config, device: torch.device) -> dict[str, Any]:
    """build_val_loader's arguments from the config (all but the index and its rank)."""
    return {"image_size": image_size(cfg), "crop_pct": cfg.data.crop_pct,
            "batch_size": cfg.data.eval_batch_size, **loading(cfg, device)}


def views_backend(cfg: Config, device: torch.device) -> str:
    """The decoder that renders the views: torch (PIL), dali-cpu or dali-gpu. Decoders
    differ by a few pixel levels, so a cache records the one its views came from."""
    if data_backend(cfg, device) == "torch":
        return "torch"
    return "dali-gpu" if device.type == "cuda" else "dali-cpu"


def num_views(cfg: Config) -> int:
    """V, the one rule: distill.num_views, or one view per showing of the planned run."""
    from deit_fast.data_pipeline.sampler import full_views

    return cfg.distill.num_views or full_views(cfg.train.epochs, cfg.data.repeats)


def cache_identity(cfg: Config, index: DatasetIndex, teacher_sha256: str,
                   device: torch.device, world_size: int) -> dict[str, Any]:
    """What a run and its teacher cache must agree on (teacher_cache.IDENTITY_FIELDS): the
    data, the views, the teacher and, by mode, the views held (views) or what fixes the
    mixed batches: the per-rank batch, the ranks and the mixing recipe (batches)."""
    d = cfg.distill
    identity = dict(
        cache_mode=d.cache_mode, classes=index.classes, dataset_fingerprint=index.fingerprint,
        num_samples=len(index),
        seed=cfg.train.seed, plan=dataclasses.asdict(plan_params(cfg)),
        repeats=cfg.data.repeats, num_classes=len(index.classes), teacher=d.teacher or "",
        teacher_checkpoint_sha256=teacher_sha256, topk=d.topk, epochs=cfg.train.epochs,
        views_backend=views_backend(cfg, device))
    data = cfg.data
    if d.cache_mode == "views":
        identity["num_views"] = num_views(cfg)
    else:
        identity.update(batch_size=data.batch_size, world_size=world_size, mixup={
            "mixup": data.mixup, "cutmix": data.cutmix, "prob": data.mixup_prob,
            "switch_prob": data.mixup_switch_prob})
    return json.loads(json.dumps(identity))  # as the manifest holds it: tuples are lists


def cache_geometry(cfg: Config, num_samples: int, world_size: int) -> tuple[int, int, int]:
    """(groups, rows a group, rows a shard) of the cache: views x samples, or epochs x the
    items of an epoch's global batches, in shards of whole global steps."""
    from deit_fast.data_pipeline.sampler import RepeatedAugSampler

    d = cfg.distill
    if d.cache_mode == "views":
        return num_views(cfg), num_samples, d.shard_size
    sampler = RepeatedAugSampler(num_samples, cfg.data.batch_size, cfg.data.repeats, 0, 0,
                                 world_size)
    step = sampler.items_per_step
    return cfg.train.epochs, sampler.steps_per_epoch * step, max(1, d.shard_size // step) * step
