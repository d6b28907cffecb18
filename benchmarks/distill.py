"""Distillation step benchmark: the student's training step with cached vs online teacher.

One training step as the trainer runs it (forward, DistillationLoss, backward, AdamW), the
same student and the same batch, in three rows of one run: no distillation, hard
distillation from the teacher-logit cache (the lookup in a real on-disk TeacherCache and
the rebuild of the distribution are inside the timed step), and hard distillation from
the online teacher (its forward on every batch). Weights are random: only time matters.
On the CPU the defaults are the demo's models (micro DeiT with a distillation token,
timm's test_resnet teacher, 32 px); on a GPU pass e.g. --student
deit_small_distilled_patch16_224 --teacher regnety_160 --img-size 224 --batch 256.

    python benchmarks/distill.py [--student NAME] [--teacher NAME] [--img-size S]
                                 [--batch B] [--steps N] [--warmup W] [--threads T]
                                 [--out DIR]
    (or: deit-fast bench distill ...)

Writes distill_<device>.csv to --out and prints the table last.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, not benchmarks/

from data_pipeline.teacher_cache import ShardWriter, TeacherCache, manifest_header  # noqa: E402
from deit_fast.config import load_config  # noqa: E402
from deit_fast.losses import DistillationLoss  # noqa: E402
from deit_fast.models import create_model  # noqa: E402
from deit_fast.optim import build_optimizer  # noqa: E402


def random_cache(folder: Path, num_samples: int, num_classes: int, topk: int) -> TeacherCache:
    header = manifest_header(dataset_fingerprint="bench", num_samples=num_samples, seed=0,
                             plan={}, num_classes=num_classes, teacher="random",
                             teacher_checkpoint_sha256="", num_views=1, topk=topk,
                             shard_size=num_samples)
    writer = ShardWriter(folder, header)
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.standard_normal((num_samples, num_classes), np.float32))
    top = torch.log_softmax(logits, dim=1).topk(topk)
    writer.write(writer.layout.shards()[0], top.values.numpy(), top.indices.numpy())
    writer.finalize()
    return TeacherCache(folder)


def time_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds of one step after warm-up."""
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="deit_micro_distilled_patch4_32")
    parser.add_argument("--teacher", default="test_resnet", help="a timm model name")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--topk", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    import timm

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    student = create_model(args.student, img_size=args.img_size, num_classes=args.classes)
    student.to(device).train()
    teacher = timm.create_model(args.teacher, pretrained=False, num_classes=args.classes)
    teacher.to(device).eval().requires_grad_(False)
    optimizer = build_optimizer(student, load_config().optim, 5e-4, device)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    targets = torch.nn.functional.one_hot(labels, args.classes).float()
    samples, views = torch.arange(args.batch), torch.zeros(args.batch, dtype=torch.int64)
    folder = tempfile.TemporaryDirectory()
    cache = random_cache(Path(folder.name), args.batch, args.classes, args.topk)

    def make_step(loss: DistillationLoss, use_cache: bool):
        def step() -> None:
            teacher_targets = cache.targets(views, samples) if use_cache else None
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss_value = loss(images, student(images), targets, teacher_targets)
            optimizer.zero_grad(set_to_none=True)
            loss_value.backward()
            optimizer.step()
        return step

    rows = []
    for name, loss, use_cache in (("none", DistillationLoss(), False),
                                  ("hard, cached teacher", DistillationLoss("hard"), True),
                                  ("hard, online teacher",
                                   DistillationLoss("hard", teacher=teacher), False)):
        seconds = time_steps(make_step(loss, use_cache), args.steps, args.warmup, device)
        rows.append({"distillation": name, "ms_per_step": round(1000 * seconds, 2),
                     "img_per_s": round(args.batch / seconds, 1)})
    folder.cleanup()
    cached = rows[1]["ms_per_step"]
    for row in rows:
        row["vs_cached"] = round(row["ms_per_step"] / cached, 2)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()}, {torch.get_num_threads()} threads of {os.cpu_count()} cores"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"distill_{device.type}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"student {args.student}, teacher {args.teacher}, {args.img_size} px, batch "
          f"{args.batch}, {device.type} ({machine}), torch {torch.__version__}; "
          f"median of {args.steps} steps; wrote {path}")
    print(f"{'distillation':<24}{'ms/step':>10}{'img/s':>10}{'vs cached':>11}")
    for row in rows:
        print(f"{row['distillation']:<24}{row['ms_per_step']:>10}{row['img_per_s']:>10}"
              f"{row['vs_cached']:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
