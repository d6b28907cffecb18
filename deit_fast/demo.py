"""The built-in demo: distillation through attention, on scikit-learn's handwritten digits,
on the CPU, in the regime `deit-fast demo --ablation` measures (deit_fast/ablation.py).

The 1797 8x8 digits are written as 32x32 RGB JPEGs in ImageFolder trees with one fixed,
stratified train/val split (VAL_FRACTION), so the demo runs the same data path as
ImageNet. The students learn 40 training digits of each class (400); the teacher, timm's
test_resnet, learns all 899 through the same Trainer. Stages: the plain student (configs/demo.yaml),
the teacher, its batches cache (the teacher's output on every mixed batch the distilled
student will train on), and the student distilled through its distillation token with the
ablation's chosen row (DISTILLED). summary.json holds both students, the gap, and the
ablation's paired 95% interval for that row over its seeds: one seed is not a result.
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

# The students' recipe: configs/demo.yaml, the same file `deit-fast train --config` reads.
DEMO_RECIPE = CONFIG_DIR / "demo.yaml"
PER_CLASS = 40  # training digits of each class the students learn
# Half the digits are val: 898 images make the top-1 of a ~95% model vary by ~0.7 points
# from the sample alone (binomial), where the usual 20% (359) make it ~1.2.
VAL_FRACTION = 0.5

# The teacher: timm's ~370k-parameter test ResNet, trained here on all training digits
# (nothing is downloaded) through the same Trainer as the students.
TEACHER = "test_resnet"
TEACHER_OVERRIDES = ("model.name=test_resnet", "data.batch_size=64", "optim.lr=3e-3",
                     "model.drop_path=0.0", "train.epochs=30")

# The distilled student: soft distillation through the distillation token at tau 4, chosen
# on held-out training digits (benchmarks/results/distill_selection.md), from a batches
# cache of the whole distribution (10 classes).
DISTILLED_ROW = "soft, distillation token (tau 4, lambda 0.5)"
DISTILLED = ("model.name=deit_micro_distilled_patch4_32", "distill.type=soft",
             "distill.tau=4.0", "distill.alpha=0.5")
CACHED = ("distill.source=cache", "distill.cache_mode=batches", f"distill.teacher={TEACHER}",
          "distill.topk=10")

ABLATION_RESULTS = Path("benchmarks/results/distill_ablation.json")


def ablation_interval(row: str = DISTILLED_ROW, head: str = "joint") -> dict[str, Any] | None:
    """The committed ablation's paired difference to the plain student for `row` (mean and
    95% interval over its seeds), or None where the results are not at hand."""
    from deit_fast import REPOSITORY

    path = REPOSITORY / ABLATION_RESULTS if REPOSITORY else None
    if path is None or not path.is_file():
        return None
    ablation = json.loads(path.read_text())
    for r in ablation["rows"]:
        if r["row"] == row and r["head"] == head:
            return {"row": row, "head": head, "seeds": ablation["seeds"],
                    "plain_top1": ablation["rows"][0]["top1_mean"],
                    "plain_std": ablation["rows"][0]["top1_std"],
                    **{k: r[k] for k in ("top1_mean", "top1_std", "paired_mean",
                                         "paired_ci95")}}
    return None


def demo_config(output_dir: str | Path, overrides: list[str] | tuple[str, ...] = (),
                data: str | Path | None = None) -> Config:
    """configs/demo.yaml with the data and run folders under output_dir, then overrides."""
    run_dir = Path(output_dir)
    if not DEMO_RECIPE.is_file():
        raise FileNotFoundError(f"the demo recipe {DEMO_RECIPE} is missing")
    return load_config(DEMO_RECIPE, [f"data.path={data or run_dir / 'digits'}",
                                     f"train.output_dir={run_dir / 'run'}", *overrides])


def write_digits(root: str | Path, size: int = 32, val_fraction: float = VAL_FRACTION,
                 seed: int = 0, per_class: int | None = None,
                 held_out_as_val: bool = False) -> dict[str, int]:
    """Write the digits as size x size RGB JPEGs under root/{train,val}/<digit>/; idempotent.
    per_class: keep that many training digits of each class (the same val split), and with
    held_out_as_val the val folder holds the training digits left out instead (a split to
    choose settings on, which the reported val split never sees)."""
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
        keep = len(members) if per_class is None else n_val + per_class
        train, val = members[n_val:keep], members[:n_val]
        if held_out_as_val:
            val = members[keep:]
        for split, chosen in (("val", val), ("train", train)):
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


def write_demo_digits(output_dir: Path, students: Path, held_out_as_val: bool = False
                      ) -> tuple[dict[str, int], dict[str, int]]:
    """The two digits trees and their counts: all of them in output_dir/digits (the
    teacher's), and PER_CLASS training digits a class in `students` (write_digits'
    held_out_as_val)."""
    return (write_digits(output_dir / "digits"),
            write_digits(students, per_class=PER_CLASS, held_out_as_val=held_out_as_val))


def teacher_config(output_dir: Path, overrides: list[str] | tuple[str, ...] = (),
                   teacher_overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The teacher's run in output_dir/teacher_run: the recipe with overrides, then
    TEACHER_OVERRIDES and teacher_overrides, on all the digits (output_dir/digits)."""
    return demo_config(output_dir, [*overrides, *TEACHER_OVERRIDES, *teacher_overrides,
                                    f"train.output_dir={output_dir / 'teacher_run'}"],
                       data=output_dir / "digits")


def train_teacher(cfg: Config) -> float:
    """Train the teacher as configured (teacher_config); its val top-1. Its weights are the
    run's last_checkpoint."""
    from deit_fast.run import train

    shutil.rmtree(cfg.train.output_dir, ignore_errors=True)
    return train(cfg)["top1"]


def last_checkpoint(cfg: Config) -> Path:
    """A run's checkpoints/last.pt: the teacher run's is the file distill.teacher_checkpoint
    names."""
    return Path(cfg.train.output_dir) / "checkpoints" / "last.pt"


def run_demo(output_dir: str | Path, overrides: list[str] | tuple[str, ...] = (),
             teacher_overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Digits; the plain student; the teacher; its batches cache; the distilled student.
    Writes and returns summary.json. One CPU thread, as the ablation: its students are the
    ablation's seed 0 (another thread count rounds differently, and the runs drift)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(Path(output_dir), overrides, teacher_overrides)
    finally:
        torch.set_num_threads(threads)


def _run_demo(output_dir: Path, overrides: list[str] | tuple[str, ...],
              teacher_overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    from deit_fast.cache_teacher import cache_teacher
    from deit_fast.run import train

    students = output_dir / "digits_40"
    cfg = demo_config(output_dir, overrides, data=students)
    teacher_cfg = teacher_config(output_dir, overrides, teacher_overrides)
    distill = demo_config(output_dir, [*overrides, *DISTILLED, *CACHED,
                                       f"distill.teacher_checkpoint={last_checkpoint(teacher_cfg)}",
                                       f"distill.cache_dir={output_dir / 'teacher_cache'}",
                                       f"train.output_dir={output_dir / 'run_distilled'}"],
                          data=students)
    seconds: dict[str, float] = {}

    def stage(name: str, work: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = work()
        seconds[f"{name}_seconds"] = round(time.perf_counter() - started, 1)
        return result

    all_counts, counts = stage("data", lambda: write_demo_digits(output_dir, students))
    for folder in (cfg.train.output_dir, distill.train.output_dir, distill.distill.cache_dir):
        shutil.rmtree(folder, ignore_errors=True)  # the demo always trains afresh
    plain = stage("student_train", lambda: train(cfg))
    teacher_top1 = stage("teacher_train", lambda: train_teacher(teacher_cfg))
    stage("teacher_cache", lambda: cache_teacher(distill))
    distilled = stage("distilled_train", lambda: train(distill))
    summary = {
        "student_top1": plain.get("top1"),
        "distilled_top1": distilled.get("top1"),
        "distilled_gap_points": round(distilled["top1"] - plain["top1"], 2),
        "teacher_top1": teacher_top1,
        "distilled_row": DISTILLED_ROW,
        "ablation": ablation_interval(),
        "teacher": TEACHER,
        "train_images": counts["train"],
        "teacher_train_images": all_counts["train"],
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


def describe(summary: dict[str, Any]) -> str:
    """The demo's result in words: both students, the gap, and the ablation's interval."""
    lines = [f"deit-fast demo: on {summary['val_images']} val digits, the plain student "
             f"reaches {summary['student_top1']:.2f}% and the student distilled from "
             f"{summary['teacher']} ({summary['teacher_top1']:.2f}%) through its distillation "
             f"token {summary['distilled_top1']:.2f}%: {summary['distilled_gap_points']:+.2f} "
             "points, one seed."]
    ablation = summary.get("ablation")
    if ablation is None:
        lines.append(f"No ablation interval for this row: it is read from {ABLATION_RESULTS} "
                     "of a source checkout (an installed package has none), which is not here "
                     "or does not hold the row; one seed alone cannot tell the gap from the "
                     "seed spread.")
    else:
        low, high = ablation["paired_ci95"]
        verdict = "above" if low > 0 else "below" if high < 0 else "not distinguishable from"
        lines.append(f"Over seeds {ablation['seeds']} the ablation measured this row "
                     f"({ablation['row']}) at {ablation['paired_mean']:+.2f} points from the "
                     f"plain student ({ablation['plain_top1']:.2f} ± {ablation['plain_std']:.2f}%)"
                     f", 95% interval {low:+.2f} to {high:+.2f}: {verdict} it "
                     "(benchmarks/results/distill_ablation.md).")
    return "\n".join(lines)
