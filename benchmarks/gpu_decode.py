"""JPEG decode benchmark: torchvision's batched nvJPEG decode on the GPU against PIL on the CPU.

Generates JPEGs in memory (500x375 at quality 90 by default, about 90 kB each, near an
average ImageNet photo: smooth colour fields plus fine noise, so they compress like
photographs) and reports decoded images/s and compressed MB/s for:
    pil                 PIL decode to RGB, one thread
    pil-threads         the same on a thread pool of every core (PIL releases the GIL)
    torchvision-cpu     torchvision.io.decode_jpeg on the CPU, one call per image
    torchvision-cuda    decode_jpeg(list, device="cuda"): nvJPEG, one call per batch
    cuda+resize224      the same, then a bilinear (antialiased) resize to 224x224 on the GPU
File reading is left out (the bytes are in memory): this measures the decoders. DALI is
not used here; where it is installed, benchmarks/data.py measures the full loaders.

    python benchmarks/gpu_decode.py [--images 512] [--batches 64,256] [--out DIR]
    (--smoke: a few small images, CPU decoders only; for CI)

Writes decode_<device>.csv and a .json sidecar (device, versions, date, command, image
size, mean bytes) to --out, and prints the table last.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, not benchmarks/

from benchmarks.run_info import add_out_argument, file_stem, wrote  # noqa: E402


def make_jpegs(count: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    """Photograph-like JPEGs at quality 90: upsampled colour fields plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3),
                              dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
        noisy = smooth.astype(np.int16) + rng.normal(0, 14, smooth.shape).astype(np.int16)
        buffer = io.BytesIO()
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _median_s(fn: Callable[[], object], reps: int, cuda: bool) -> float:
    fn()  # warm-up: thread pools, nvJPEG handles, CUDA context
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _pil_decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _cases(jpegs: list[bytes], batches: list[int], cuda: bool,
           pool: ThreadPoolExecutor) -> list[tuple]:
    """(backend, batch, a call that decodes every image once, or why it cannot run)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]

    def pil() -> None:
        for j in jpegs:
            _pil_decode(j)

    def pil_threads() -> None:
        list(pool.map(_pil_decode, jpegs))

    def tv_cpu() -> None:
        for t in tensors:
            decode_jpeg(t, mode=ImageReadMode.RGB)

    def tv_cuda(batch: int, resize: bool) -> Callable[[], None]:
        def run() -> None:
            for i in range(0, len(tensors), batch):
                images = decode_jpeg(tensors[i:i + batch], mode=ImageReadMode.RGB,
                                     device="cuda")
                if resize:  # every image here has one size, so the batch stacks
                    F.interpolate(torch.stack(images).float(), size=(224, 224),
                                  mode="bilinear", antialias=True)
        return run

    cases: list[tuple] = [("pil", 1, pil), ("pil-threads", 1, pil_threads),
                          ("torchvision-cpu", 1, tv_cpu)]
    for backend, resize in (("torchvision-cuda", False), ("cuda+resize224", True)):
        for batch in batches:
            cases.append((backend, batch, tv_cuda(batch, resize) if cuda else
                          "skipped: no CUDA GPU"))
    return cases


def measure(jpegs: list[bytes], batches: list[int], reps: int, cuda: bool) -> list[dict]:
    megabytes = sum(map(len, jpegs)) / 1e6
    workers = os.cpu_count() or 1
    rows = []
    with ThreadPoolExecutor(workers) as pool:
        for backend, batch, run in _cases(jpegs, batches, cuda, pool):
            row: dict[str, Any] = {"backend": backend, "batch": batch,
                                   "workers": workers if backend == "pil-threads" else 1,
                                   "images": len(jpegs), "img_per_s": "", "mb_per_s": "",
                                   "status": run if isinstance(run, str) else "ok"}
            if not isinstance(run, str):
                try:
                    seconds = _median_s(run, reps, cuda and "cuda" in backend)
                except RuntimeError as err:  # e.g. a torchvision built without nvJPEG
                    row["status"] = f"error: {str(err).strip().splitlines()[0][:160]}"
                else:
                    row.update(img_per_s=round(len(jpegs) / seconds, 1),
                               mb_per_s=round(megabytes / seconds, 1))
            print(f"{backend:<18}batch {batch:<5}{row['img_per_s']!s:>10} img/s  "
                  f"{row['status']}", flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    pil = next((r["img_per_s"] for r in rows if r["backend"] == "pil" and r["img_per_s"]), None)
    header = f"{'backend':<18}{'batch':>6}{'workers':>8}{'img/s':>10}{'MB/s':>9}{'vs pil':>8}" \
             "  status"
    lines = [header, "-" * len(header)]
    for r in rows:
        speedup = f"{r['img_per_s'] / pil:.1f}x" if pil and r["img_per_s"] else ""
        lines.append(f"{r['backend']:<18}{r['batch']:>6}{r['workers']:>8}"
                     f"{r['img_per_s']!s:>10}{r['mb_per_s']!s:>9}{speedup:>8}  {r['status']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="JPEGs to generate")
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of every JPEG")
    parser.add_argument("--batches", default="64,256", help="batch sizes of the GPU decode")
    parser.add_argument("--reps", type=int, default=5, help="timed passes over all images")
    parser.add_argument("--smoke", action="store_true",
                        help="8 small images, CPU decoders only (for CI)")
    add_out_argument(parser, "the CSV and JSON")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    batches = [int(b) for b in args.batches.split(",")]
    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        args.images, width, height, batches, args.reps = 8, 64, 48, [4], 2
    elif not torch.cuda.is_available():
        print("benchmarks/gpu_decode.py: no CUDA GPU; use --smoke to run the CPU decoders "
              "on a few small images", file=sys.stderr)
        return 2
    import torchvision

    jpegs = make_jpegs(args.images, width, height)
    name = torch.cuda.get_device_name() if cuda else \
        f"cpu ({platform.processor() or platform.machine()})"
    rows = measure(jpegs, batches, args.reps, cuda)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"decode_{file_stem(name, args.smoke)}"
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = {
        "device": name, "cpu_cores": os.cpu_count(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/gpu_decode.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "images": len(jpegs), "size": f"{width}x{height}", "quality": 90,
        "mean_bytes": round(sum(map(len, jpegs)) / len(jpegs)), "reps": args.reps,
    }
    Path(f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(wrote(args.out, [f"{stem.name}.csv", f"{stem.name}.json"]))
    best = max((r for r in rows if r["backend"] == "torchvision-cuda" and r["img_per_s"]),
               key=lambda r: r["img_per_s"], default=None)
    threads = next((r["img_per_s"] for r in rows if r["backend"] == "pil-threads"), None)
    if best and threads:
        print(f"GPU batched decode: {best['img_per_s']:.0f} img/s at batch {best['batch']}, "
              f"{best['img_per_s'] / threads:.1f}x PIL on {os.cpu_count()} threads")
    print(f"{name} | {os.cpu_count()} CPU cores | torch {torch.__version__} | torchvision "
          f"{torchvision.__version__} | {len(jpegs)} JPEGs {width}x{height} q90, "
          f"{meta['mean_bytes'] / 1e3:.0f} kB mean | {meta['date']}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
