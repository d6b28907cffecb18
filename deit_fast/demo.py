"""The built-in demo: a small DeiT trained on scikit-learn's handwritten digits, on the CPU.

The 1797 8x8 digits are upsampled to 32x32 RGB JPEGs in an ImageFolder tree (a fixed,
stratified 80/20 train/val split), so the demo runs the same data path as ImageNet.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from deit_fast.config import Config, load_config

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


def run_demo(output_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Build the digits dataset, train the student, write summary.json; returns the summary."""
    from deit_fast.run import train

    output_dir = Path(output_dir)
    cfg = demo_config(output_dir, overrides)
    started = time.perf_counter()
    counts = write_digits(cfg.data.path)
    data_seconds = time.perf_counter() - started
    shutil.rmtree(cfg.train.output_dir, ignore_errors=True)  # the demo always trains afresh
    started = time.perf_counter()
    result = train(cfg)
    train_seconds = time.perf_counter() - started
    summary = {
        "student_top1": result.get("top1"),
        "student_ema_top1": result.get("ema_top1"),
        "student_top5": result.get("top5"),
        "train_images": counts["train"],
        "val_images": counts["val"],
        "epochs": cfg.train.epochs,
        "data_seconds": round(data_seconds, 1),
        "student_train_seconds": round(train_seconds, 1),
        "curves": str(Path(cfg.train.output_dir) / "curves.png"),
    }
    with open(output_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary
