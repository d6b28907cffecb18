"""The built-in demo: a small DeiT trained on scikit-learn's handwritten digits, on the CPU,
then a small convnet teacher, its logit cache, and the DeiT distilled from that cache.

The 1797 8x8 digits are upsampled to 32x32 RGB JPEGs in an ImageFolder tree (a fixed,
stratified 80/20 train/val split), so the demo runs the same data path as ImageNet.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deit_fast.config import Config, load_config

# The teacher: timm's ~370k-parameter test ResNet, trained here on the digits for a few
# epochs (nothing is downloaded); it is a better digit reader than the micro DeiT.
TEACHER = "test_resnet"
TEACHER_EPOCHS = 6
TEACHER_BATCH = 64
TEACHER_LR = 3e-3

# The recipe of configs/demo.yaml, kept here so an installed package can run the demo alone.
DEMO_OVERRIDES = (
    "model.name=deit_micro_patch4_32",
    "model.drop_path=0.0",
    "data.batch_size=32",
    "data.eval_batch_size=256",
    "data.num_workers=1",
    "data.repeats=1",
    "data.scale=[0.6,1.0]",
    "data.hflip=0.0",
    "data.rand_augment=null",
    "data.reprob=0.0",
    "data.mixup=0.0",
    "data.cutmix=0.0",
    "data.label_smoothing=0.1",
    "optim.lr=2e-3",
    "optim.scale_lr=false",
    "optim.warmup_epochs=1",
    "optim.min_lr=1e-5",
    "optim.weight_decay=0.05",
    "train.epochs=20",
    "train.precision=fp32",
    "train.device=cpu",
    "train.ema_decay=0.99",
    "train.log_interval=10",
    "kernels.attention=sdpa",
    "kernels.layernorm=torch",
    "kernels.gelu=torch",
)


# The student distilled from the cached teacher: hard distillation through the distillation
# token, one cached view per epoch (V = epochs * repeats), top-1 is all hard needs.
DISTILL_OVERRIDES = (
    "model.name=deit_micro_distilled_patch4_32",
    "distill.type=hard",
    "distill.source=cache",
    f"distill.teacher={TEACHER}",
    "distill.topk=1",
)


def demo_config(output_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    run_dir = Path(output_dir)
    return load_config(None, [*DEMO_OVERRIDES, f"data.path={run_dir / 'digits'}",
                              f"train.output_dir={run_dir / 'run'}", *overrides])


def write_digits(root: str | Path, size: int = 32, val_fraction: float = 0.2,
                 seed: int = 0) -> dict[str, int]:
    """Write the digits as size x size RGB JPEGs under root/{train,val}/<digit>/; idempotent."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        members = np.flatnonzero(digits.target == label)
        members = members[rng.permutation(len(members))]
        n_val = round(len(members) * val_fraction)
        for split, chosen in (("val", members[:n_val]), ("train", members[n_val:])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                path = folder / f"{i:04d}.jpg"
                if not path.exists():
                    pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
                    image = Image.fromarray(pixels).resize((size, size), Image.BICUBIC)
                    image.convert("RGB").save(path, quality=95)
                counts[split] += 1
    return counts


def train_teacher(cfg: Config, path: Path, epochs: int = TEACHER_EPOCHS) -> float:
    """Train the demo's convnet teacher on the student's own views; save it; val top-1."""
    import timm
    import torch
    import torch.nn.functional as F

    from data_pipeline import DatasetIndex, build_train_loader, build_val_loader
    from deit_fast.evaluate import evaluate
    from deit_fast.run import image_size, plan_params

    torch.manual_seed(cfg.train.seed)
    index = DatasetIndex.from_folder(cfg.data.path, split="train")
    loader = build_train_loader(index, plan_params(cfg), batch_size=TEACHER_BATCH,
                                seed=cfg.train.seed, repeats=1, num_workers=cfg.data.num_workers)
    model = timm.create_model(TEACHER, num_classes=len(index.classes))
    steps = epochs * loader.steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=TEACHER_LR, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, TEACHER_LR, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        for batch in loader.epoch(epoch):
            loss = F.cross_entropy(model(batch.images), batch.labels, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    val = build_val_loader(DatasetIndex.from_folder(cfg.data.path, split="val"),
                           image_size=image_size(cfg), crop_pct=cfg.data.crop_pct, num_workers=0)
    torch.save(model.state_dict(), path)
    return evaluate(model, val, torch.device("cpu"))["top1"]


def run_demo(output_dir: str | Path, overrides: list[str] | tuple[str, ...] = (),
             teacher_epochs: int = TEACHER_EPOCHS) -> dict[str, Any]:
    """Digits; the student; a convnet teacher; its cache; the student distilled from it
    (hard, through the distillation token). Writes and returns summary.json."""
    from deit_fast.cache_teacher import cache_teacher
    from deit_fast.run import train

    output_dir = Path(output_dir)
    cfg = demo_config(output_dir, overrides)
    seconds: dict[str, float] = {}

    def stage(name: str, work: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = work()
        seconds[f"{name}_seconds"] = round(time.perf_counter() - started, 1)
        return result

    counts = stage("data", lambda: write_digits(cfg.data.path))
    teacher_path = output_dir / "teacher.pt"
    distill = demo_config(output_dir, [*overrides, *DISTILL_OVERRIDES,
                                       f"distill.teacher_checkpoint={teacher_path}",
                                       f"distill.cache_dir={output_dir / 'teacher_cache'}",
                                       f"train.output_dir={output_dir / 'run_distilled'}"])
    for folder in (cfg.train.output_dir, distill.train.output_dir, distill.distill.cache_dir):
        shutil.rmtree(folder, ignore_errors=True)  # the demo always trains afresh
    result = stage("student_train", lambda: train(cfg))
    teacher_top1 = stage("teacher_train", lambda: train_teacher(cfg, teacher_path, teacher_epochs))
    stage("teacher_cache", lambda: cache_teacher(distill))
    distilled = stage("distilled_train", lambda: train(distill))
    summary = {
        "student_top1": result.get("top1"),
        "student_ema_top1": result.get("ema_top1"),
        "student_top5": result.get("top5"),
        "teacher_top1": teacher_top1,
        "distilled_top1": distilled.get("top1"),
        "distilled_ema_top1": distilled.get("ema_top1"),
        "teacher": TEACHER,
        "train_images": counts["train"],
        "val_images": counts["val"],
        "epochs": cfg.train.epochs,
        **seconds,
        "total_seconds": round(sum(seconds.values()), 1),
        "curves": str(Path(cfg.train.output_dir) / "curves.png"),
        "distilled_curves": str(Path(distill.train.output_dir) / "curves.png"),
    }
    with open(output_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary
