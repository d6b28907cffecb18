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

from deit_fast import CONFIG_DIR
from deit_fast.config import Config, load_config

# The recipe: configs/demo.yaml, the same file `deit-fast train --config` reads.
DEMO_RECIPE = CONFIG_DIR / "demo.yaml"

# The teacher: timm's ~370k-parameter test ResNet, trained here on the digits (nothing is
# downloaded) through the same Trainer as the student; it reads digits better than the
# micro DeiT does.
TEACHER = "test_resnet"
TEACHER_EPOCHS = 6
TEACHER_OVERRIDES = ("data.batch_size=64", "optim.lr=3e-3", "train.ema=false",
                     "model.drop_path=0.0")

# The distilled student: the distillation row of the ablation (deit-fast demo --ablation,
# benchmarks/results/distill_ablation.md) closest to the plain student; none beat it by
# more than the seed spread. Soft distillation needs the whole distribution: k = 10.
DISTILL_OVERRIDES = (
    "distill.type=soft",
    "distill.tau=3.0",
    "distill.alpha=0.1",
    "distill.source=cache",
    f"distill.teacher={TEACHER}",
    "distill.topk=10",
)


ABLATION_RESULTS = DEMO_RECIPE.parent.parent / "benchmarks" / "results" / "distill_ablation.json"


def ablation_spread() -> dict[str, Any] | None:
    """The seed spread the committed ablation measured (one seed here is not a spread)."""
    if not ABLATION_RESULTS.is_file():
        return None
    ablation = json.loads(ABLATION_RESULTS.read_text())
    return {"regime": ablation["regime"], "std_points": {
        row["row"]: row["top1_std"] for row in ablation["rows"]}}


def demo_config(output_dir: str | Path, overrides: list[str] | tuple[str, ...] = (),
                data: str | Path | None = None) -> Config:
    """configs/demo.yaml with the data and run folders under output_dir, then overrides."""
    run_dir = Path(output_dir)
    if not DEMO_RECIPE.is_file():
        raise FileNotFoundError(f"the demo recipe {DEMO_RECIPE} is missing")
    return load_config(DEMO_RECIPE, [f"data.path={data or run_dir / 'digits'}",
                                     f"train.output_dir={run_dir / 'run'}", *overrides])


def write_digits(root: str | Path, size: int = 32, val_fraction: float = 0.2,
                 seed: int = 0, per_class: int | None = None) -> dict[str, int]:
    """Write the digits as size x size RGB JPEGs under root/{train,val}/<digit>/; idempotent.
    per_class: keep that many training images of each digit (the same val set)."""
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
        train = members[n_val:] if per_class is None else members[n_val:n_val + per_class]
        for split, chosen in (("val", members[:n_val]), ("train", train)):
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


def train_teacher(cfg: Config, path: Path) -> float:
    """Train the demo's convnet teacher with the Trainer (its train_step, no distillation,
    the recipe's label smoothing) on the student's views; save its weights; val top-1."""
    import timm
    import torch

    from deit_fast.losses import DistillationLoss
    from deit_fast.run import build_data
    from deit_fast.train import Trainer

    torch.manual_seed(cfg.train.seed)
    device = torch.device(cfg.train.device)
    index, train_loader, val_loader, mixup = build_data(cfg, device)
    model = timm.create_model(TEACHER, num_classes=len(index.classes)).to(device)
    run_dir = Path(cfg.train.output_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    trainer = Trainer(cfg, model, train_loader, val_loader, DistillationLoss(), mixup, device,
                      run_dir, fingerprint=index.fingerprint)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    torch.save(model.state_dict(), path)
    return summary["top1"]


def run_demo(output_dir: str | Path, overrides: list[str] | tuple[str, ...] = (),
             teacher_epochs: int = TEACHER_EPOCHS) -> dict[str, Any]:
    """Digits; the student; a convnet teacher; its cache; the student distilled from it
    (DISTILL_OVERRIDES). Writes and returns summary.json."""
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
    teacher_cfg = demo_config(output_dir, [*overrides, *TEACHER_OVERRIDES,
                                           f"train.epochs={teacher_epochs}",
                                           f"train.output_dir={output_dir / 'teacher_run'}"])
    teacher_top1 = stage("teacher_train", lambda: train_teacher(teacher_cfg, teacher_path))
    stage("teacher_cache", lambda: cache_teacher(distill))
    distilled = stage("distilled_train", lambda: train(distill))
    summary = {
        "student_top1": result.get("top1"),
        "student_ema_top1": result.get("ema_top1"),
        "student_top5": result.get("top5"),
        "teacher_top1": teacher_top1,
        "distilled_top1": distilled.get("top1"),
        "distilled_ema_top1": distilled.get("ema_top1"),
        "distilled_gap_points": round(distilled["top1"] - result["top1"], 2),
        "distill_recipe": list(DISTILL_OVERRIDES),
        "seed_spread": ablation_spread(),
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
