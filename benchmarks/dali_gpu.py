"""DALI training pipeline on the GPU: img/s of the project's own DALI train loader with the
full DeiT recipe, and its images against the CPU graph on the same plan.

The loader is `build_train_loader(..., backend="dali")`, as the trainer builds it: ROI JPEG
decode with the hardware decoder (device "mixed"), cubic resize, flip, RandAugment
rand-m9-mstd0.5-inc1, normalize, random erasing 0.25, repeated augmentation 3. The files
are generated ImageNet-like JPEGs (500x375, quality 90, benchmarks/data.py); a few hundred
distinct ones are hard-linked under more names so the timed batches stay in one epoch (the
plan differs per sample, so every view is its own crop). Timing: batches after warm-up,
through the iterator, with the device synchronized at both ends.

Check: the first batch of the GPU loader and of the same graph on the CPU (device "cpu",
device_id=None), same seed and plan, must show the same samples, labels, repeats and views,
and images whose PSNR (0-255 units) is at least --min-psnr for every image: the GPU and
CPU JPEG decoders and resamplers differ by rounding, not by content.

    python benchmarks/dali_gpu.py [--images 6144] [--unique 512] [--batch 256]
                                  [--workers N] [--warmup 4] [--steps 16] [--out DIR]
    python benchmarks/dali_gpu.py --smoke   # CPU graph on 24 images (for CI)

Writes dali_<device>.csv and .json (device, versions, date, command) to --out and prints
the table last. Exits 1 when the check fails, 2 when DALI or the GPU is missing.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, not benchmarks/

from benchmarks.data import make_imagenet_like  # noqa: E402
from benchmarks.run_info import add_out_argument, file_stem, run_meta, wrote  # noqa: E402
from deit_fast.config import Config  # noqa: E402
from deit_fast.data_pipeline import (  # noqa: E402
    DatasetIndex,
    PlanParams,
    TrainBatch,
    build_train_loader,
)
from deit_fast.resolve import plan_params, train_loading  # noqa: E402


def dali_loader(index: DatasetIndex, params: PlanParams, batch: int, workers: int,
                device: torch.device) -> object:
    """The trainer's DALI train loader: the recipe's seed and repeats, this run's batch."""
    return build_train_loader(index, **{**train_loading(Config(), device), "params": params,
                                        "batch_size": batch, "num_workers": workers,
                                        "backend": "dali"})


def make_tree(root: Path, images: int, unique: int) -> DatasetIndex:
    """`unique` generated JPEGs, hard-linked up to `images` files in the same class folders."""
    make_imagenet_like(str(root), unique)
    files = sorted((root / "train").glob("*/*.JPEG"))
    for i in range(unique, images):
        source = files[i % unique]
        os.link(source, source.parent / f"{i:06d}.JPEG")
    return DatasetIndex.from_folder(str(root), "train")


def first_batch(index: DatasetIndex, params: PlanParams, batch: int, workers: int,
                device: torch.device) -> TrainBatch:
    """Batch 0 of epoch 0 of a loader that is shut down again (its workers would compete)."""
    loader = dali_loader(index, params, batch, workers, device)
    out = next(loader.epoch(0))
    del loader
    gc.collect()
    return out


def compare(ref: TrainBatch, got: TrainBatch, params: PlanParams, min_psnr: float) -> dict:
    """Same samples, labels, repeats and views; PSNR (0-255 units) and max |diff| of images."""
    same = all(torch.equal(getattr(ref, k), getattr(got, k).cpu())
               for k in ("labels", "samples", "repeats", "views"))
    std = torch.tensor(params.std).view(1, 3, 1, 1) * 255
    diff = (got.images.cpu() - ref.images) * std
    psnr = 10 * torch.log10(255**2 / (diff**2).mean(dim=(1, 2, 3)).clamp_min(1e-10))
    return {"images": len(psnr), "same_samples": same, "psnr_min": float(psnr.min()),
            "psnr_median": float(psnr.median()), "max_abs_diff": float(diff.abs().max()),
            "ok": same and bool((psnr >= min_psnr).all())}


def time_loader(index: DatasetIndex, params: PlanParams, args,
                device: torch.device) -> tuple[TrainBatch, dict]:
    """The first batch (for the check), then img/s over args.steps batches after
    args.warmup more: the pipeline's start-up is left out."""
    start = time.perf_counter()
    loader = dali_loader(index, params, args.batch, args.workers, device)
    if loader.steps_per_epoch < 1 + args.warmup + args.steps:
        raise ValueError(f"--images {len(index)} gives {loader.steps_per_epoch} batches an "
                         f"epoch; the check, warm-up and steps need {1 + args.warmup + args.steps}")
    batches = loader.epoch(0)
    first = next(batches)
    for _ in range(args.warmup):
        next(batches)
    built = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        out = next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if out.images.shape != (args.batch, 3, params.image_size, params.image_size):
        raise RuntimeError(f"the loader gave images of shape {tuple(out.images.shape)}")
    return first, {"img_per_s": round(args.steps * args.batch / seconds, 1),
                   "ms_per_batch": round(1000 * seconds / args.steps, 2),
                   "startup_s": round(built, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6144, help="files (hard links included)")
    parser.add_argument("--unique", type=int, default=512, help="distinct generated JPEGs")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--warmup", type=int, default=4, help="batches before timing")
    parser.add_argument("--steps", type=int, default=16, help="timed batches")
    parser.add_argument("--min-psnr", type=float, default=30.0)
    parser.add_argument("--target", type=float, default=10_000,
                        help="img/s to reach (the DeiT-S step target)")
    parser.add_argument("--smoke", action="store_true",
                        help="the CPU graph (device_id=None) on 24 images, for CI")
    add_out_argument(parser, "the CSV and JSON")
    args = parser.parse_args(argv)
    try:
        import nvidia.dali
    except ImportError as err:
        print(f"benchmarks/dali_gpu.py: DALI is not importable ({err}); scripts/unpack_dali.sh "
              "brings it to an offline machine", file=sys.stderr)
        return 2
    if args.smoke:
        args.images, args.unique, args.batch, args.workers = 24, 8, 4, 1
        args.warmup, args.steps = 1, 2
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("benchmarks/dali_gpu.py: no CUDA GPU; --smoke runs the CPU graph", file=sys.stderr)
        return 2
    params = plan_params(Config())  # the DeiT recipe: 224 px, rand-m9-mstd0.5-inc1, erasing 0.25

    with tempfile.TemporaryDirectory() as scratch:
        index = make_tree(Path(scratch), args.images, args.unique)
        # The CPU graph first, while CUDA is not initialised: its workers can fork.
        reference = first_batch(index, params, args.batch, args.workers, torch.device("cpu"))
        first, timed = time_loader(index, params, args, device)
        check = compare(reference, first, params, args.min_psnr)
    name = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()})"
    row = {"loader": f"dali-{device.type}", "device": name, "batch": args.batch,
           "workers": args.workers, "images": args.images, "unique": args.unique,
           **timed, "rand_augment": params.rand_augment, "reprob": params.reprob,
           "check_images": check["images"], "psnr_min": round(check["psnr_min"], 2),
           "psnr_median": round(check["psnr_median"], 2),
           "max_abs_diff": round(check["max_abs_diff"], 2),
           "check": "ok" if check["ok"] else "FAILED"}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"dali_{file_stem(name, args.smoke)}"
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    meta = {**run_meta(name, "dali_gpu.py", argv), "dali": nvidia.dali.__version__,
            "cpu_cores": os.cpu_count(), "jpeg": "500x375 q90", "check": check}
    Path(f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")

    print(wrote(args.out, [f"{stem.name}.csv", f"{stem.name}.json"]))
    print(f"CHECK: {'ok' if check['ok'] else 'FAILED'}: {check['images']} images vs the CPU "
          f"graph: same samples {check['same_samples']}, PSNR min {check['psnr_min']:.1f} dB "
          f"(>= {args.min_psnr}), median {check['psnr_median']:.1f}, max |diff| "
          f"{check['max_abs_diff']:.1f}/255")
    if not args.smoke:
        verdict = "PASS" if timed["img_per_s"] >= args.target else "MISS"
        print(f"{verdict} DALI img/s >= {args.target:.0f}: {timed['img_per_s']:.0f}")
    print(f"DALI: {timed['img_per_s']:.0f} img/s at batch {args.batch}, {args.workers} workers, "
          f"on {name}")
    for key, value in row.items():
        print(f"{key:<14}{value}")
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
