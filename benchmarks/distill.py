"""Distillation step benchmark: the Trainer's own step with the cached vs the online teacher.

Each row times `Trainer.train_step` (mixup, the configured loss, backward, AdamW, EMA, the
NaN guard) on one batch already on the device, for the same student: no distillation;
hard distillation from a batches cache (the batch carries the teacher's top-k of its mixed
images, as the loader's workers attach it; the step rebuilds the distribution); hard
distillation from
the online teacher (its forward on every mixed batch). The cache's lookup runs in the
loader's workers, off the step; its CPU time per batch is reported beside the table.
Weights are random: only time matters.

    deit-fast bench distill --teacher regnety_160 --student deit_small_distilled_patch16_224 \
        --batch 256                                  (on a GPU, bf16)
    deit-fast bench distill --threads 1              (CPU: the demo's models, 32 px, fp32)
    [--img-size S] [--classes C] [--topk K] [--steps N] [--warmup W] [--out DIR]

Writes distill_<device>.csv (one row per distillation, with the student, teacher, image
size, batch, precision and machine that ran it) to --out and prints the table last.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, not benchmarks/

from benchmarks.run_info import add_out_argument, wrote  # noqa: E402
from deit_fast.config import load_config  # noqa: E402
from deit_fast.data_pipeline.teacher_cache import ShardWriter, TeacherCache, manifest_header  # noqa: E402
from deit_fast.losses import DistillationLoss  # noqa: E402
from deit_fast.models import MODEL_SPECS, create_model  # noqa: E402
from deit_fast.resolve import build_mixup  # noqa: E402
from deit_fast.teacher import TeacherTargets  # noqa: E402
from deit_fast.train import Trainer  # noqa: E402


class OneBatch:
    """The loader seam the Trainer's constructor reads; the benchmark feeds batches itself."""

    steps_per_epoch, bad_files = 1_000_000, frozenset()

    def __init__(self, batch: int) -> None:
        self.items_per_step = batch


def random_cache(folder: Path, num_samples: int, num_classes: int, topk: int) -> TeacherCache:
    """A one-epoch batches cache of random teacher log-probabilities, on disk like a real
    one."""
    identity = {"cache_mode": "batches", "dataset_fingerprint": "bench", "topk": topk,
                "num_classes": num_classes, "teacher": "random", "epochs": 1, "repeats": 1}
    header = manifest_header(identity, groups=1, rows=num_samples, shard_rows=num_samples,
                             forwards=num_samples)
    writer = ShardWriter(folder, header)
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.standard_normal((num_samples, num_classes), np.float32))
    top = torch.log_softmax(logits, dim=1).topk(topk)
    writer.write(writer.layout.shards()[0], top.values.numpy(), top.indices.numpy())
    writer.finalize()
    return TeacherCache(folder)


def median_seconds(work, steps: int, warmup: int, device: torch.device) -> float:
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="deit_micro_distilled_patch4_32")
    parser.add_argument("--teacher", default="test_resnet", help="a timm model name")
    parser.add_argument("--img-size", type=int, help="default: the student's")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    add_out_argument(parser, "the CSV")
    args = parser.parse_args(argv)
    import timm

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.img_size or MODEL_SPECS[args.student].get("img_size", 224)
    precision = "bf16" if device.type == "cuda" else "fp32"
    torch.manual_seed(0)
    teacher = timm.create_model(args.teacher, pretrained=False, num_classes=args.classes)
    teacher.to(device).eval().requires_grad_(False)
    folder = tempfile.TemporaryDirectory()
    cache = random_cache(Path(folder.name), args.batch, args.classes, args.topk)
    rows_ids = np.arange(args.batch)
    lookup = median_seconds(lambda: cache.topk(np.zeros_like(rows_ids), rows_ids), args.steps,
                            args.warmup, torch.device("cpu"))
    values, indices = cache.topk(np.zeros_like(rows_ids), rows_ids)
    batch = SimpleNamespace(
        images=torch.randn(args.batch, 3, size, size, device=device),
        labels=torch.randint(0, args.classes, (args.batch,), device=device),
        teacher_values=values.to(device), teacher_indices=indices.to(device))
    cfg = load_config(None, [f"model.name={args.student}", f"model.img_size={size}",
                             f"data.batch_size={args.batch}", f"train.precision={precision}",
                             f"train.device={device.type}", f"train.output_dir={folder.name}",
                             "train.progress=false"])
    mixup = build_mixup(cfg.data, args.classes)  # the recipe's mixup 0.8 / cutmix 1.0
    rows = []
    for name, kind, source in (("none", "none", None), ("hard, cached teacher", "hard", "cache"),
                               ("hard, online teacher", "hard", "online")):
        student = create_model(args.student, img_size=size, num_classes=args.classes).to(device)
        targets = None if kind == "none" else TeacherTargets(
            kind, 1.0, args.classes, teacher if source == "online" else None,
            cache_mode="batches" if source == "cache" else None)
        run_dir = Path(folder.name) / name.replace(" ", "_").replace(",", "")
        trainer = Trainer(cfg, student, OneBatch(args.batch), None, DistillationLoss(kind),
                          mixup, device, run_dir, teacher_targets=targets)
        seconds = median_seconds(lambda t=trainer: t.train_step(batch), args.steps, args.warmup,
                                 device)
        trainer.close()
        rows.append({"distillation": name, "ms_per_step": round(1000 * seconds, 2),
                     "img_per_s": round(args.batch / seconds, 1)})
    folder.cleanup()
    cached = rows[1]["ms_per_step"]
    for row in rows:
        row["vs_cached"] = round(row["ms_per_step"] / cached, 2)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} threads"
    ran = {"student": args.student, "teacher": args.teacher, "img_size": size,
           "classes": args.classes, "batch": args.batch, "precision": precision,
           "machine": machine, "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"distill_{device.type}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], *ran])
        writer.writeheader()
        writer.writerows({**row, **ran} for row in rows)
    print(f"student {args.student}, teacher {args.teacher}, {size} px, {args.classes} classes, "
          f"batch {args.batch}, {precision}, {machine}, torch {torch.__version__}; "
          f"Trainer.train_step, median of {args.steps} steps; cache lookup of a batch (top-"
          f"{args.topk}, in a loader worker, off the step): {1000 * lookup:.2f} ms")
    print(wrote(args.out, [path.name]))
    print(f"{'distillation':<24}{'ms/step':>10}{'img/s':>10}{'vs cached':>11}")
    for row in rows:
        print(f"{row['distillation']:<24}{row['ms_per_step']:>10}{row['img_per_s']:>10}"
              f"{row['vs_cached']:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
