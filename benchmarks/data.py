"""Data-pipeline benchmark: img/s of each loader backend on the same files, and index rate.

    python benchmarks/data.py                    # loaders on 1024 generated 500x375 JPEGs
    python benchmarks/data.py --what index       # DatasetIndex on 100k generated small files
    python benchmarks/data.py --data-path /data/imagenet --workers 8 [--out DIR]

Loaders: the torch fallback, DALI on the CPU and, with a GPU, DALI on the GPU, each with
the DeiT recipe (RandomResizedCrop 224, flip, rand-m9-mstd0.5-inc1, erasing 0.25) and the
same number of CPU workers. Writes data_loaders.csv (or data_index.csv) to --out and prints
the table last.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.run_info import add_out_argument, wrote  # noqa: E402
from deit_fast import cpu_name  # noqa: E402
from deit_fast.config import Config  # noqa: E402
from deit_fast.data_pipeline import DatasetIndex, build_train_loader  # noqa: E402
from deit_fast.resolve import plan_params, train_loading  # noqa: E402

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "coins",
    "retina",
    "cat",
)


def make_imagenet_like(root: str, count: int, classes: int = 10) -> None:
    """count JPEGs of 500x375 (quality 90): random crops and scales of scikit-image photos."""
    from skimage import data as photos

    rng = np.random.default_rng(0)
    sources = [Image.fromarray(getattr(photos, name)()).convert("RGB") for name in PHOTOS]
    for i in range(count):
        src = sources[i % len(sources)]
        scale = rng.uniform(1.0, 2.0) * max(500 / src.width, 375 / src.height)
        img = src.resize((int(src.width * scale) + 1, int(src.height * scale) + 1))
        x, y = rng.integers(0, img.width - 500 + 1), rng.integers(0, img.height - 375 + 1)
        folder = os.path.join(root, "train", f"n{i % classes:08d}")
        os.makedirs(folder, exist_ok=True)
        img.crop((x, y, x + 500, y + 375)).save(os.path.join(folder, f"{i:06d}.JPEG"), quality=90)


def make_small_files(root: str, count: int, classes: int = 1000) -> None:
    """count tiny JPEG files in `classes` folders: only the indexer's speed matters."""
    from io import BytesIO

    buffer = BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    for c in range(classes):
        folder = os.path.join(root, "train", f"n{c:08d}")
        os.makedirs(folder)
        for i in range(c, count, classes):
            with open(os.path.join(folder, f"{i:07d}.JPEG"), "wb") as f:
                f.write(buffer.getvalue())


def cpu_seconds() -> float:
    """CPU time of this process and all its descendants (Linux /proc): loader workers included."""
    tick, total, pending = os.sysconf("SC_CLK_TCK"), 0, [os.getpid()]
    while pending:
        pid = pending.pop()
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    pending += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # a worker that exited meanwhile
    return total / tick


def bench_loader(index: DatasetIndex, backend: str, device: torch.device, args) -> dict:
    """img/s and CPU ms per image over args.steps batches, after args.warmup batches."""
    params = dataclasses.replace(plan_params(Config()), image_size=args.image_size,
                                 rand_augment=args.rand_augment or None)
    loader = build_train_loader(index, **{
        **train_loading(Config(), device), "params": params, "batch_size": args.batch_size,
        "num_workers": args.workers, "backend": backend})
    batches = (batch for epoch in range(1000) for batch in loader.epoch(epoch))
    for _ in range(args.warmup):
        next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), cpu_seconds()
    for _ in range(args.steps):
        next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    images = args.steps * args.batch_size
    return {"img_per_s": images / seconds, "cpu_ms_per_img": 1000 * cpu / images}


def bench_loaders(index: DatasetIndex, args) -> list[dict]:
    """Backends take turns for args.rounds rounds (a busy machine slows all alike); medians."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    runs = [
        (b, d)
        for b in args.backends.split(",")
        for d in devices
        if not (b == "torch" and d.type == "cuda")
    ]  # torch-cuda does torch-cpu's CPU work
    results: dict[str, list[dict]] = {f"{b}-{d.type}": [] for b, d in runs}
    for _ in range(args.rounds):
        for backend, device in runs:
            results[f"{backend}-{device.type}"].append(bench_loader(index, backend, device, args))
    rows = []
    for name, measured in results.items():
        rate = float(np.median([m["img_per_s"] for m in measured]))
        cpu = float(np.median([m["cpu_ms_per_img"] for m in measured]))
        rows.append(
            {
                "loader": name,
                "img_per_s": round(rate, 1),
                "cpu_ms_per_img": round(cpu, 2),
                "runs": " ".join(f"{m['img_per_s']:.0f}" for m in measured),
                "workers": args.workers,
                "rand_augment": args.rand_augment or "off",
                "batch": args.batch_size,
                "size": args.image_size,
            }
        )
    base = rows[0]
    for row in rows:
        row["speedup"] = round(row["img_per_s"] / base["img_per_s"], 2)
    return rows


def bench_index(root: str, count: int) -> dict:
    if not os.path.isdir(os.path.join(root, "train")):
        make_small_files(root, count)
    start = time.perf_counter()
    index = DatasetIndex.from_folder(root, "train")
    indexed = time.perf_counter() - start
    start = time.perf_counter()
    _ = index.fingerprint
    fingerprinted = time.perf_counter() - start
    rate = len(index) / (indexed + fingerprinted)
    return {
        "files": len(index),
        "index_s": round(indexed, 2),
        "fingerprint_s": round(fingerprinted, 2),
        "files_per_s": round(rate),
        "imagenet_1.28M_s_estimate": round(1_281_167 / rate, 1),
    }


def machine() -> str:
    """CPU model and count, GPU, library versions: what a speed claim needs beside it."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    try:
        import nvidia.dali

        dali = nvidia.dali.__version__
    except ImportError:
        dali = "absent"
    return (
        f"{cpu_name()} x {os.cpu_count()}, {gpu}, torch {torch.__version__}, "
        f"DALI {dali}, Pillow {Image.__version__}"
    )


def print_table(rows: list[dict]) -> None:
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for row in rows:
        print("  ".join(str(row[k]).ljust(w) for k, w in zip(keys, widths)))


def report(rows: list[dict], out: Path, name: str, unit: str = "") -> None:
    """Write rows as out/name, then print where, the machine line and the table (last)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / name, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(wrote(out, [name]))
    print(f"# {machine()}, {time.strftime('%Y-%m-%d')}{unit}")
    print_table(rows)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("loaders", "index"), default="loaders")
    parser.add_argument("--data-path", help="an ImageFolder root (with train/); default: generate")
    parser.add_argument("--images", type=int, default=1024, help="JPEGs to generate")
    parser.add_argument("--index-files", type=int, default=100_000)
    parser.add_argument("--backends", default="torch,dali")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rand-augment", default="rand-m9-mstd0.5-inc1", help="'' for off")
    parser.add_argument("--warmup", type=int, default=4, help="batches before timing")
    parser.add_argument("--steps", type=int, default=10, help="timed batches")
    parser.add_argument("--rounds", type=int, default=3, help="turns each backend takes")
    add_out_argument(parser, "the CSV")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        if args.what == "index":
            rows = [bench_index(args.data_path or scratch, args.index_files)]
        else:
            root = args.data_path or scratch
            if not args.data_path:
                make_imagenet_like(root, args.images)
            rows = bench_loaders(DatasetIndex.from_folder(root, "train"), args)
    report(rows, args.out, f"data_{args.what}.csv")
    return rows


if __name__ == "__main__":
    main()
