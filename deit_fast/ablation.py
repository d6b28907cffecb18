"""`deit-fast demo --ablation`: the paper's distillation comparison (its Table 3), small.

On the digits, in a data-efficient regime (PER_CLASS training images of each digit, the
full validation split), over several seeds: the micro DeiT without distillation; soft
distillation on the class token (the paper's tau 3.0, lambda 0.1); hard distillation on
the class token; hard distillation through the distillation token, evaluated with the
class head, the distillation head and both (joint, the mean of the two). One convnet
teacher is trained once (through the same Trainer); each seed has its own cached teacher
(the plan and the sampler follow the seed), with every class kept (k = 10), so soft
distillation is exact. The teacher's accuracy is measured on the clean training images
and on the augmented views the students see (read from the caches themselves).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deit_fast.demo import TEACHER, TEACHER_OVERRIDES, demo_config, train_teacher, write_digits

PER_CLASS = 40
EPOCHS = 15
TEACHER_EPOCHS = 18  # about as many steps as the full demo's teacher takes (batch 64)
SEEDS = (0, 1, 2)
PLAIN, DISTILLED = "deit_micro_patch4_32", "deit_micro_distilled_patch4_32"
# (row, model, distillation overrides, heads evaluated)
ROWS = (
    ("no distillation", PLAIN, ("distill.type=none",), ("joint",)),
    ("soft, class token (tau 3, lambda 0.1)", PLAIN,
     ("distill.type=soft", "distill.tau=3.0", "distill.alpha=0.1"), ("joint",)),
    ("hard, class token", PLAIN, ("distill.type=hard", "distill.alpha=0.5"), ("joint",)),
    ("hard, distillation token", DISTILLED, ("distill.type=hard", "distill.alpha=0.5"),
     ("class", "distillation", "joint")),
)
TABLE = Path("benchmarks/results/distill_ablation.md")


class Head(nn.Module):
    """One head of a distilled DeiT at evaluation: class, distillation, or joint (mean)."""

    def __init__(self, model: nn.Module, head: str) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, images: Tensor) -> Tensor:
        if self.head == "joint":
            return self.model(images)
        tokens = self.model.forward_features(images)
        if self.head == "class":
            return self.model.head(tokens[:, 0])
        return self.model.head_dist(tokens[:, 1])


def teacher_on_cached_views(cache_dir: Path, labels: np.ndarray) -> float:
    """Top-1 (%) of the cached teacher on every view it computed: the students' views."""
    from deit_fast.data_pipeline.teacher_cache import NOT_SHOWN, TeacherCache

    cache = TeacherCache(cache_dir)
    hits = total = 0
    for entry in cache.manifest["shards"]:
        views = np.full(entry["count"], entry["view"])
        samples = np.arange(entry["first_sample"], entry["first_sample"] + entry["count"])
        _, indices = cache.topk(views, samples, strict=False)
        shown = indices[:, 0].numpy() != NOT_SHOWN
        hits += int((indices[:, 0].numpy()[shown] == labels[samples[shown]]).sum())
        total += int(shown.sum())
    return 100.0 * hits / total


def _eval_heads(cfg: Any, heads: tuple[str, ...]) -> dict[str, float]:
    """Val top-1 of each head of the run's last weights."""
    from deit_fast import checkpoint
    from deit_fast.data_pipeline import DatasetIndex, build_val_loader
    from deit_fast.evaluate import evaluate
    from deit_fast.recipe import image_size
    from deit_fast.run import build_model

    index = DatasetIndex.from_folder(cfg.data.path, split="val")
    model = build_model(cfg, len(index.classes), torch.device("cpu"))
    model.load_state_dict(checkpoint.load(Path(cfg.train.output_dir) / "checkpoints" /
                                          "last.pt")["model"])
    loader = build_val_loader(index, image_size=image_size(cfg), crop_pct=cfg.data.crop_pct,
                              batch_size=cfg.data.eval_batch_size, num_workers=0)
    return {h: evaluate(Head(model, h), loader, torch.device("cpu"))["top1"] for h in heads}


def _clean_train_top1(cfg: Any, teacher_path: Path) -> float:
    from deit_fast.data_pipeline import DatasetIndex, build_val_loader
    from deit_fast.evaluate import evaluate
    from deit_fast.recipe import image_size
    from deit_fast.teacher import load_teacher

    index = DatasetIndex.from_folder(cfg.data.path, split="train")
    teacher = load_teacher(TEACHER, str(teacher_path), len(index.classes), torch.device("cpu"))
    loader = build_val_loader(index, image_size=image_size(cfg), crop_pct=cfg.data.crop_pct,
                              batch_size=cfg.data.eval_batch_size, num_workers=0)
    return evaluate(teacher, loader, torch.device("cpu"))["top1"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_ablation(output_dir: str | Path, overrides: list[str] | tuple[str, ...] = (),
                 seeds: tuple[int, ...] = SEEDS, per_class: int = PER_CLASS,
                 epochs: int = EPOCHS, teacher_epochs: int = TEACHER_EPOCHS,
                 table: str | Path | None = TABLE) -> dict[str, Any]:
    """Train every row over every seed; write summary.json (and the markdown table, with
    the same numbers as JSON beside it)."""
    from deit_fast.cache_teacher import cache_teacher
    from deit_fast.data_pipeline import DatasetIndex
    from deit_fast.run import train

    out = Path(output_dir)
    data = out / f"digits_{per_class}_per_class"
    counts = write_digits(data, per_class=per_class)
    labels = DatasetIndex.from_folder(data, split="train").labels

    def config(seed: int, *extra: str):
        return demo_config(out, [f"train.seed={seed}", f"train.epochs={epochs}",
                                 "train.ema=false", f"train.eval_interval={epochs}",
                                 *overrides, *extra], data=data)

    started = time.perf_counter()
    teacher_path = out / "teacher.pt"
    teacher_cfg = config(0, *TEACHER_OVERRIDES, f"train.epochs={teacher_epochs}",
                         f"train.output_dir={out / 'teacher_run'}")
    teacher_val = train_teacher(teacher_cfg, teacher_path)
    teacher_seconds = time.perf_counter() - started
    teacher_clean = _clean_train_top1(teacher_cfg, teacher_path)

    def distill_keys(seed: int) -> list[str]:
        return ["distill.source=cache", f"distill.teacher={TEACHER}", "distill.topk=10",
                f"distill.teacher_checkpoint={teacher_path}",
                f"distill.cache_dir={out / f'teacher_cache_seed{seed}'}"]

    teacher_views, cache_seconds = [], 0.0
    for seed in seeds:
        cfg = config(seed, "distill.type=hard", *distill_keys(seed))
        shutil.rmtree(cfg.distill.cache_dir, ignore_errors=True)
        t = time.perf_counter()
        cache_teacher(cfg)
        cache_seconds += time.perf_counter() - t
        teacher_views.append(teacher_on_cached_views(Path(cfg.distill.cache_dir), labels))

    rows = []
    for i, (name, model, keys, heads) in enumerate(ROWS):
        top1: dict[str, list[float]] = {h: [] for h in heads}
        seconds = []
        for seed in seeds:
            run_dir = out / f"row{i}_seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = config(seed, f"model.name={model}", *keys, *distill_keys(seed),
                         f"train.output_dir={run_dir}")
            t = time.perf_counter()
            train(cfg)
            seconds.append(time.perf_counter() - t)
            for head, value in _eval_heads(cfg, heads).items():
                top1[head].append(value)
        for head in heads:
            mean, std = _mean_std(top1[head])
            rows.append({"row": name if len(heads) == 1 else f"{name}, {head} head",
                         "model": model, "top1_mean": round(mean, 2), "top1_std": round(std, 2),
                         "top1_per_seed": [round(v, 2) for v in top1[head]],
                         "seconds_per_run": round(statistics.fmean(seconds), 1)})
    summary = {
        "regime": f"{per_class} training images per digit ({counts['train']} in all), "
                  f"{counts['val']} val images, {epochs} epochs, seeds {list(seeds)}",
        "train_images": counts["train"], "val_images": counts["val"], "epochs": epochs,
        "seeds": list(seeds), "teacher": TEACHER, "teacher_epochs": teacher_epochs,
        "teacher_val_top1": round(teacher_val, 2),
        "teacher_clean_train_top1": round(teacher_clean, 2),
        "teacher_augmented_view_top1": round(statistics.fmean(teacher_views), 2),
        "teacher_seconds": round(teacher_seconds, 1),
        "cache_seconds_per_seed": round(cache_seconds / len(seeds), 1),
        "rows": rows, "total_seconds": round(time.perf_counter() - started, 1),
    }
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    if table is not None:  # the table, and its numbers beside it as JSON
        Path(table).parent.mkdir(parents=True, exist_ok=True)
        Path(table).write_text(markdown(summary))
        Path(table).with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"Regime: {summary['regime']}. Teacher {summary['teacher']} "
             f"({summary['teacher_epochs']} epochs): val top-1 {summary['teacher_val_top1']}%, "
             f"clean train images {summary['teacher_clean_train_top1']}%, augmented train "
             f"views (the students' own, from the caches) "
             f"{summary['teacher_augmented_view_top1']}%.", "",
             "| row | val top-1 (%), mean ± std | per seed | s per run |", "|---|---|---|---|"]
    for r in summary["rows"]:
        seeds = ", ".join(f"{v:.1f}" for v in r["top1_per_seed"])
        lines.append(f"| {r['row']} | {r['top1_mean']:.2f} ± {r['top1_std']:.2f} | {seeds} | "
                     f"{r['seconds_per_run']} |")
    lines.append("")
    lines.append(f"Teacher training {summary['teacher_seconds']} s, cache pass "
                 f"{summary['cache_seconds_per_seed']} s per seed, all "
                 f"{summary['total_seconds']} s.")
    return "\n".join(lines) + "\n"
