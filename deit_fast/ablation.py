"""`deit-fast demo --ablation`: the paper's Table 3 (distillation), small, measured with its
spread.

The instrument (configs/demo.yaml, the demo's regime): a micro DeiT (patch 4, 16 px, 4
blocks of width 96) learns 400 digits (40 a class) for 100 epochs with the paper's Mixup
0.8 and CutMix 1.0, crops of scale 0.35-1, label smoothing 0.1, AdamW at lr 1e-3 after 5
warm-up epochs, no EMA, and is evaluated on the 898 val digits (half of them: the top-1 of
a ~95% model then varies by ~0.7 points from the sample alone) with its last weights. The
teacher, timm's test_resnet, learned all 899 training digits: a teacher that saw more
than its student, as when one distils on one's own small dataset from a teacher trained on
a larger one (Hinton et al.'s transfer set), so there is something to transfer. Every row
trains on the same seeds; a seed fixes the data order, the views and the mixing, so rows
differ by their teacher signal only and are compared pair by pair.

Rows: no distillation; soft distillation on the class token (the paper's tau 3, lambda
0.1); hard distillation on the class token; hard distillation through the distillation
token, evaluated with the class head, the distillation head and both (joint: the mean of
the two); soft distillation through the distillation token at the tau chosen on held-out
training digits (`--select`, which never looks at the val digits). Every distillation row
reads a batches cache (the teacher on each mixed batch); the demo's row is also trained
with the online teacher and with a views cache (the teacher on unmixed views, mixed
afterwards). Per row: mean and std over the seeds; per distillation row, the paired
difference to the plain student and its 95% t-interval. One CPU thread, runs resumable:
each run's result is kept, and a rerun skips it.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deit_fast.demo import (
    CACHED,
    DISTILLED,
    DISTILLED_ROW,
    PER_CLASS,
    TEACHER,
    demo_config,
    last_checkpoint,
    teacher_config,
    train_teacher,
    write_demo_digits,
)
from deit_fast.models.deit import HEADS
from deit_fast.resolve import image_size

SEEDS = (0, 1, 2, 3, 4)
PLAIN, TOKEN = "deit_micro_patch4_32", "deit_micro_distilled_patch4_32"
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262}  # Student's t, 97.5% quantile, by degrees of freedom


@dataclass(frozen=True)
class Row:
    name: str
    overrides: tuple[str, ...]
    heads: tuple[str, ...] = ("joint",)
    source: tuple[str, ...] = CACHED  # where the teacher's targets come from


ROWS = (
    Row("no distillation", (f"model.name={PLAIN}", "distill.type=none"), source=()),
    Row("soft, class token (tau 3, lambda 0.1)",
        (f"model.name={PLAIN}", "distill.type=soft", "distill.tau=3.0", "distill.alpha=0.1")),
    Row("hard, class token", (f"model.name={PLAIN}", "distill.type=hard", "distill.alpha=0.5")),
    Row("hard, distillation token",
        (f"model.name={TOKEN}", "distill.type=hard", "distill.alpha=0.5"), HEADS),
    Row(DISTILLED_ROW, DISTILLED, HEADS),
    Row(f"{DISTILLED_ROW}, online teacher", DISTILLED,
        source=("distill.source=online", f"distill.teacher={TEACHER}")),
    Row(f"{DISTILLED_ROW}, views cache", DISTILLED,
        source=(*CACHED, "distill.cache_mode=views")),
)
# --select: distillation-token settings tried on held-out training digits, three seeds
SELECTION = tuple(
    Row(f"soft, distillation token (tau {tau:g}, lambda 0.5)",
        (f"model.name={TOKEN}", "distill.type=soft", f"distill.tau={tau}", "distill.alpha=0.5"))
    for tau in (1.0, 2.0, 4.0, 8.0)) + (ROWS[3],)
SELECTION_SEEDS = (0, 1, 2)


def eval_heads(cfg: Any, heads: tuple[str, ...]) -> dict[str, float]:
    """Val top-1 of each head of the run's last weights, as `deit-fast eval --head` measures
    it with the run's own config."""
    from deit_fast.checkpoint_eval import evaluate_checkpoint

    run_config = str(Path(cfg.train.output_dir) / "config.yaml")
    return {head: evaluate_checkpoint(run_config, [], str(last_checkpoint(cfg)), head=head)["top1"]
            for head in heads}


def teacher_signal(cfg: Any) -> dict[str, float]:
    """What the teacher says about the student's mixed training images beyond their mixed
    labels, from a batches cache of the whole distribution (top-k = classes), over all its
    batches: how often its top class is the one the mix is mostly made of (the larger
    lambda's), its mean probability there and the mass it puts outside the two mixed
    classes, and the mean total variation distance to the mixed one-hot labels."""
    from deit_fast.cache_teacher import batch_work
    from deit_fast.data_pipeline import DatasetIndex
    from deit_fast.data_pipeline.mixup import mix_targets
    from deit_fast.data_pipeline.teacher_cache import TeacherCache, rebuild_distribution
    from deit_fast.resolve import build_mixup

    cache = TeacherCache(cfg.distill.cache_dir)
    labels = torch.from_numpy(DatasetIndex.from_folder(cfg.data.path, split="train").labels)
    classes, size = cache.num_classes, image_size(cfg)
    mixup = build_mixup(cfg.data, classes, cfg.train.seed)
    agree, on_top, outside, distance, n = 0.0, 0.0, 0.0, 0.0, 0
    for b in batch_work(cfg, cache.layout.shards(), len(labels), world_size=1):
        samples = b.keys[:, 1]  # the cache pass's own batches, mixing keys and rows
        perm, weights = mixup.params(b.mix, size, size, len(samples))
        mixed = mix_targets(torch.eye(classes)[labels[samples]], perm, weights)
        teacher = rebuild_distribution(*cache.topk(
            [b.shard.group] * len(samples), b.shard.first_row + b.rows), classes)
        top = mixed.argmax(1)
        agree += (teacher.argmax(1) == top).sum().item()
        on_top += teacher.gather(1, top[:, None]).sum().item()
        outside += (teacher * (mixed == 0)).sum().item()
        distance += 0.5 * (teacher - mixed).abs().sum().item()
        n += len(samples)
    return {"top_class_agrees": round(100 * agree / n, 2),
            "probability_on_top_class": round(on_top / n, 3),
            "mass_outside_the_mix": round(outside / n, 3),
            "tv_distance_to_mixed_labels": round(distance / n, 3)}


def paired(values: list[float], base: list[float]) -> dict[str, Any]:
    """The mean paired difference (points) and its 95% t-interval over the seeds."""
    diffs = [v - b for v, b in zip(values, base)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"paired_mean": round(mean, 2), "paired_ci95": None}
    half = T_975[len(diffs) - 1] * statistics.stdev(diffs) / len(diffs) ** 0.5
    return {"paired_mean": round(mean, 2), "paired_ci95": [round(mean - half, 2),
                                                           round(mean + half, 2)]}


class Ablation:
    """Trains rows over seeds in `out`, keeping every run's result in runs_<data>.jsonl."""

    def __init__(self, out: Path, data: Path, overrides: tuple[str, ...], teacher: Path) -> None:
        self.out, self.data, self.overrides, self.teacher = out, data, overrides, teacher
        self.log = out / f"runs_{data.name}.jsonl"  # one per split: a row is a name there
        self.done = {}
        if self.log.is_file():
            self.done = {(r["row"], r["seed"]): r for r in map(json.loads, self.log.open())}

    def config(self, seed: int, *extra: str, run: str = "run", cache: str = "cache") -> Any:
        return demo_config(self.out, [
            f"train.seed={seed}", "train.progress=false", "data.num_workers=0",
            *self.overrides, f"distill.teacher_checkpoint={self.teacher}",
            f"distill.cache_dir={self.out / f'{cache}_seed{seed}'}", *extra,
            f"train.output_dir={self.out / run}"], data=self.data)

    def run(self, row: Row, seed: int) -> dict[str, Any]:
        from deit_fast.cache_teacher import cache_teacher
        from deit_fast.run import train, uses_cache

        if (row.name, seed) in self.done:
            return self.done[(row.name, seed)]
        mode = "views" if "distill.cache_mode=views" in row.source else "batches"
        cfg = self.config(seed, *row.overrides, *row.source, run="current", cache=mode)
        started = time.perf_counter()
        if uses_cache(cfg):  # one cache per seed and mode serves all rows
            cache_teacher(cfg)
        shutil.rmtree(cfg.train.output_dir, ignore_errors=True)
        train(cfg)
        result = {"row": row.name, "seed": seed, "top1": eval_heads(cfg, row.heads),
                  "seconds": round(time.perf_counter() - started, 1)}
        with self.log.open("a") as f:
            f.write(json.dumps(result) + "\n")
        self.done[(row.name, seed)] = result
        return result

    def table(self, rows: tuple[Row, ...], seeds: tuple[int, ...]) -> list[dict[str, Any]]:
        """Every row and head: mean, std and per-seed top-1, and the paired difference to
        the first row's joint head."""
        results = {row: [self.run(row, seed) for seed in seeds] for row in rows}
        base = [r["top1"]["joint"] for r in results[rows[0]]]
        out = []
        for row, runs in results.items():
            for head in row.heads:
                values = [r["top1"][head] for r in runs]
                out.append({"row": row.name, "head": head,
                            "top1_mean": round(statistics.fmean(values), 2),
                            "top1_std": round(statistics.stdev(values), 2)
                            if len(values) > 1 else 0.0,
                            "top1_per_seed": [round(v, 2) for v in values],
                            **({} if row is rows[0] else paired(values, base)),
                            "seconds_per_run": round(statistics.fmean(
                                r["seconds"] for r in runs), 1)})
        return out


def run_ablation(output_dir: str | Path, overrides: list[str] | tuple[str, ...] = (),
                 seeds: tuple[int, ...] = SEEDS, table: str | Path | None = None,
                 select: bool = False, teacher_overrides: tuple[str, ...] = ()
                 ) -> dict[str, Any]:
    """Train the teacher, then every row over every seed; write summary.json and, with
    `table`, the markdown table with its JSON beside it. select: the selection of the soft
    tau on held-out training digits instead (SELECTION)."""
    seeds = SELECTION_SEEDS if select and seeds == SEEDS else seeds
    if len(seeds) - 1 > max(T_975):  # before hours of training, not after
        raise ValueError(f"seeds: {len(seeds)} given; T_975, the t quantiles of the paired "
                         f"interval, covers at most {max(T_975) + 1}")
    torch.set_num_threads(1)  # one thread: the same machine reproduces the table bit for bit
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    students = out / ("digits_40_dev" if select else "digits_40")
    _, counts = write_demo_digits(out, students, held_out_as_val=select)
    started = time.perf_counter()
    teacher_cfg = teacher_config(out, overrides, (*teacher_overrides, "train.progress=false"))
    teacher_val = None
    if not last_checkpoint(teacher_cfg).is_file():
        teacher_val = train_teacher(teacher_cfg)
    ablation = Ablation(out, students, tuple(overrides), last_checkpoint(teacher_cfg))
    rows = ablation.table((ROWS[0], *SELECTION) if select else ROWS, seeds)
    cfg = ablation.config(seeds[0], cache="batches")
    summary = {
        "regime": f"{PER_CLASS} training images per digit ({counts['train']} in all), "
                  f"{counts['val']} {'held-out training' if select else 'val'} images, "
                  f"{cfg.train.epochs} epochs at {image_size(cfg)} px, seeds "
                  f"{list(seeds)}",
        "split": "held-out training" if select else "val",
        "train_images": counts["train"], "eval_images": counts["val"],
        "epochs": cfg.train.epochs, "seeds": list(seeds), "teacher": TEACHER,
        "teacher_val_top1": round(teacher_val, 2) if teacher_val is not None else
        _last_top1(teacher_cfg),
        "teacher_signal": teacher_signal(cfg),
        "rows": rows, "run_seconds": round(sum(r["seconds"] for r in ablation.done.values()
                                               if r["row"] in {row["row"] for row in rows}
                                               and r["seed"] in seeds), 1),
        "seconds_this_call": round(time.perf_counter() - started, 1),
        "provenance": provenance(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if table is not None:
        Path(table).parent.mkdir(parents=True, exist_ok=True)
        Path(table).write_text(markdown(summary))
        Path(table).with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary


def provenance() -> dict[str, str]:
    """What produced a table: the command, the date, the machine, the versions, the commit."""
    import datetime
    import sys

    from deit_fast import commit, cpu_name

    cli = Path(sys.argv[0]).name in ("deit-fast", "__main__.py")  # else a Python caller
    return {"command": "deit-fast " + " ".join(sys.argv[1:]) if cli else "run_ablation(...)",
            "date": datetime.date.today().isoformat(), "machine": f"{cpu_name()}, "
            f"{os.cpu_count()} cores, 1 torch thread", "torch": torch.__version__,
            "commit": commit()}


def _last_top1(cfg: Any) -> float | None:
    """The teacher run's last evaluation, from its metrics (a rerun reuses the teacher)."""
    from deit_fast.metrics import read_metrics

    path = Path(cfg.train.output_dir) / "metrics.jsonl"
    evals = [r for r in read_metrics(path) if "top1" in r] if path.is_file() else []
    return round(evals[-1]["top1"], 2) if evals else None


def markdown(summary: dict[str, Any]) -> str:
    p = summary["provenance"]
    lines = [f"`{p['command']}` ({p['date']}, commit {p['commit']}, {p['machine']}, torch "
             f"{p['torch']}).", "",
             f"Regime: {summary['regime']}. Teacher {summary['teacher']} on all training "
             f"digits: val top-1 {summary['teacher_val_top1']}%. Top-1 (%) on the "
             f"{summary['split']} digits; the paired difference is to the plain student on "
             "the same seeds, with its 95% t-interval.", "",
             "| row | head | top-1, mean ± std | per seed | paired difference (95% interval) "
             "| s per run |", "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        seeds = ", ".join(f"{v:.2f}" for v in r["top1_per_seed"])
        diff = "" if "paired_mean" not in r else f"{r['paired_mean']:+.2f}" + (
            "" if r["paired_ci95"] is None else
            f" ({r['paired_ci95'][0]:+.2f}, {r['paired_ci95'][1]:+.2f})")
        lines.append(f"| {r['row']} | {r['head']} | {r['top1_mean']:.2f} ± {r['top1_std']:.2f} "
                     f"| {seeds} | {diff} | {r['seconds_per_run']} |")
    signal = summary["teacher_signal"]
    lines += ["", f"What the teacher adds to the mixed labels, on the students' mixed training "
              f"images of seed {summary['seeds'][0]} (its batches cache): its top class is "
              f"the one the mix is mostly made of on {signal['top_class_agrees']}% of them, "
              f"with probability {signal['probability_on_top_class']} on average; it puts "
              f"{signal['mass_outside_the_mix']} of its mass outside the two mixed classes; "
              f"its total variation distance to the mixed one-hot labels is "
              f"{signal['tv_distance_to_mixed_labels']}.", "",
              f"{summary['run_seconds']} s of training and caching in all (teacher aside)."]
    return "\n".join(lines) + "\n"
