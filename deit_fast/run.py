"""Builds a run from a config: device, kernels, data, model, loss; then trains or evaluates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deit_fast.config import Config, save_config
from deit_fast.losses import DistillationLoss
from deit_fast.models import DeiT, create_model, load_checkpoint
from deit_fast.ops import resolve_kernels
from deit_fast.teacher import load_teacher
from deit_fast.train import Trainer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=auto")
    return torch.device(name)


def build_model(cfg: Config, num_classes: int, device: torch.device) -> DeiT:
    kernels = resolve_kernels(cfg.kernels.attention, cfg.kernels.layernorm, cfg.kernels.gelu,
                              device)
    model = create_model(cfg.model.name, kernels=kernels, img_size=cfg.model.img_size,
                         num_classes=num_classes, drop_path_rate=cfg.model.drop_path)
    if cfg.model.init_checkpoint:
        load_checkpoint(model, cfg.model.init_checkpoint, new_head=True)
    return model.to(device)


def image_size(cfg: Config) -> int:
    from deit_fast.models import MODEL_SPECS

    return cfg.model.img_size or MODEL_SPECS[cfg.model.name].get("img_size", 224)


def data_root(cfg: Config) -> Path:
    if not cfg.data.path:
        raise ValueError("data.path: no dataset given; pass data.path=/path/to/imagenet "
                         "(a folder with train/ and val/)")
    root = Path(cfg.data.path)
    if not root.is_dir():
        raise FileNotFoundError(f"data.path {str(root)!r} does not exist")
    return root


def build_data(cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1):
    """(train index, train loader, val loader, mixup) from the data_pipeline package."""
    from data_pipeline import (
        DatasetIndex,
        Mixup,
        PlanParams,
        build_train_loader,
        build_val_loader,
    )

    root, d = data_root(cfg), cfg.data
    train_index = DatasetIndex.from_folder(root, split="train")
    val_index = DatasetIndex.from_folder(root, split="val")
    if val_index.classes != train_index.classes:
        raise ValueError(f"{root}: val/ has classes {val_index.classes[:5]}..., train/ has "
                         f"{train_index.classes[:5]}...; they must match")
    size = image_size(cfg)
    params = PlanParams(image_size=size, scale=d.scale, ratio=d.ratio, hflip=d.hflip,
                        rand_augment=d.rand_augment or None, reprob=d.reprob)
    train_loader = build_train_loader(
        train_index, params=params, batch_size=d.batch_size, seed=cfg.train.seed,
        repeats=d.repeats, rank=rank, world_size=world_size, num_workers=d.num_workers,
        backend=d.backend, device=device, on_bad_image=d.on_bad_image)
    val_loader = build_val_loader(
        val_index, image_size=size, crop_pct=d.crop_pct, batch_size=d.eval_batch_size,
        num_workers=d.num_workers, backend=d.backend, device=device, rank=rank,
        world_size=world_size, on_bad_image=d.on_bad_image)
    mixup = Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, prob=d.mixup_prob,
                  switch_prob=d.mixup_switch_prob, label_smoothing=d.label_smoothing,
                  num_classes=len(train_index.classes), seed=cfg.train.seed)
    return train_index, train_loader, val_loader, mixup


def build_criterion(cfg: Config, num_classes: int, device: torch.device) -> DistillationLoss:
    teacher = None
    if cfg.distill.type != "none":
        teacher = load_teacher(cfg.distill.teacher, cfg.distill.teacher_checkpoint, num_classes,
                               device)
    return DistillationLoss(cfg.distill.type, cfg.distill.alpha, cfg.distill.tau, teacher)


def train(cfg: Config) -> dict[str, Any]:
    """Train as configured; resumes from output_dir/checkpoints/last.pt when it exists."""
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    index, train_loader, val_loader, mixup = build_data(cfg, device)
    num_classes = cfg.model.num_classes or len(index.classes)
    if num_classes != len(index.classes):
        raise ValueError(f"model.num_classes={num_classes} but the dataset has "
                         f"{len(index.classes)} classes")
    model = build_model(cfg, num_classes, device)
    criterion = build_criterion(cfg, num_classes, device)
    run_dir = Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    trainer = Trainer(cfg, model, train_loader, val_loader, criterion, mixup, device, run_dir,
                      fingerprint=index.fingerprint)
    try:
        if trainer.maybe_resume():
            print(f"resuming from {run_dir / 'checkpoints' / 'last.pt'} at epoch "
                  f"{trainer.epoch}, step {trainer.global_step}")
        return trainer.fit()
    finally:
        trainer.close()


def evaluate_checkpoint(cfg: Config, checkpoint_path: str) -> dict[str, float]:
    """Top-1/top-5 of a checkpoint (deit-fast, timm or official DeiT) on data.path/val."""
    from data_pipeline import DatasetIndex, build_val_loader
    from deit_fast.evaluate import evaluate

    device = resolve_device(cfg.train.device)
    val_index = DatasetIndex.from_folder(data_root(cfg), split="val")
    model = build_model(cfg, cfg.model.num_classes or len(val_index.classes), device)
    load_checkpoint(model, checkpoint_path)
    loader = build_val_loader(val_index, image_size=image_size(cfg), crop_pct=cfg.data.crop_pct,
                              batch_size=cfg.data.eval_batch_size,
                              num_workers=cfg.data.num_workers, backend=cfg.data.backend,
                              device=device, on_bad_image=cfg.data.on_bad_image)
    return evaluate(model, loader, device)
