"""Kernel microbenchmarks: the Triton kernels against torch eager, SDPA and torch.compile.

For the DeiT-Ti/S/B shapes (batch 256, N = 197 and 198, head dim 64) times attention,
residual+LayerNorm and bias+GELU, forward and forward+backward, and reports the median
time, TFLOP/s (attention) or GB/s (the memory-bound ops) and the fraction of the peak
measured in the same run: a large device copy for GB/s, a large bf16 matmul for TFLOP/s.
Writes kernels_<device>.csv, a .json sidecar (device, versions, date, command, peaks,
targets) and a .png plot to --out, and prints the table last.

    python benchmarks/kernel_bench.py [--smoke] [--out DIR]      (or: deit-fast bench kernels)

--smoke runs one tiny shape (batch 1, N 17, 2 heads of 32) on the CPU under the Triton
interpreter, its rows labelled "smoke": its numbers mean nothing, it keeps the script
working in CI.

Work is counted as what the op must do, the same for every implementation: attention
forward 4*B*H*N^2*D FLOPs and forward+backward 3x that (no recomputation counted);
LayerNorm forward reads x, residual and writes y, s; its backward reads dy, ds, s and
writes one gradient shared by x and residual; bias+GELU forward reads x and writes y,
its backward reads dy, x and writes dx.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))  # the repository, not benchmarks/

from benchmarks.run_info import (  # noqa: E402
    SDPA_BACKENDS,
    add_out_argument,
    cuda_or_smoke,
    device_name,
    file_stem,
    run_meta,
    wrote,
)
from deit_fast import ops  # noqa: E402

MODELS = {"DeiT-Ti": 3, "DeiT-S": 6, "DeiT-B": 12}
PASSES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Shape:
    model: str
    batch: int
    seq_len: int
    num_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    warmup: int
    reps: int
    compile_backend: str


def _shapes(smoke: bool) -> list[Shape]:
    if smoke:
        return [Shape("smoke", 1, 17, 2, 32)]
    # DeiT-S and DeiT-B carry the targets, so they run first when time is short.
    order = sorted(MODELS.items(), key=lambda item: item[0] not in ("DeiT-S", "DeiT-B"))
    return [Shape(m, 256, n, h, 64) for m, h in order for n in (197, 198)]


def _median_ms(fn: Callable[[], object], cfg: Settings) -> float:
    for _ in range(cfg.warmup):  # the first calls also autotune and compile
        fn()
    if cfg.device.type != "cuda":
        times = []
        for _ in range(cfg.reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    l2_flush = torch.empty(256 * 2**20, dtype=torch.int8, device=cfg.device)
    events = []
    for _ in range(cfg.reps):
        l2_flush.zero_()  # every rep reads its inputs from HBM, not from a warm L2
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _peaks(cfg: Settings, smoke: bool) -> dict[str, float]:
    """Copy bandwidth (GB/s) and matmul throughput (TFLOP/s) measured on this device."""
    numel = 2**20 if smoke else 2**30
    src = torch.randn(numel, device=cfg.device, dtype=cfg.dtype)
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), cfg)
    n = 256 if smoke else 8192
    mm_dtype = cfg.dtype if smoke else torch.bfloat16
    a = torch.randn(n, n, device=cfg.device, dtype=mm_dtype)
    b = torch.randn(n, n, device=cfg.device, dtype=mm_dtype)
    mm_ms = _median_ms(lambda: a @ b, cfg)
    return {
        "copy_gbps": 2 * src.nbytes / copy_ms / 1e6,
        "matmul_tflops": 2 * n**3 / mm_ms / 1e9,
    }


def _sdpa(qkv: torch.Tensor, num_heads: int, backend: SDPBackend) -> torch.Tensor:
    """The model's SDPA attention (deit_fast.ops.attention) with `backend` forced."""
    with sdpa_kernel(backend):
        return ops.attention(qkv, num_heads, "sdpa")


def _runner(fn: Callable, inputs: tuple, grads: tuple, pass_: str) -> Callable[[], object]:
    """A no-argument call of one pass: fn(*inputs), then its backward for fwd+bwd."""
    wrt = tuple(t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad)
    if pass_ == "fwd":
        return lambda: fn(*inputs)
    return lambda: torch.autograd.grad(fn(*inputs), wrt, grads)


def _cases(shape: Shape, cfg: Settings, impls: dict[str, dict[str, Callable]]):
    """(op, impls, inputs, output grads, work per pass, unit) for the three ops at shape."""
    new = partial(torch.randn, device=cfg.device, dtype=cfg.dtype)
    b, n, c = shape.batch, shape.seq_len, shape.width
    qkv = new(b, n, 3 * c, requires_grad=True)
    flops = 4 * b * shape.num_heads * n * n * shape.head_dim
    yield "attention", impls["attention"], (qkv, shape.num_heads), (new(b, n, c),), {
        "fwd": flops, "fwd+bwd": 3 * flops}, "TFLOP/s"
    x, residual = new(b, n, c, requires_grad=True), new(b, n, c, requires_grad=True)
    weight, bias = new(c, requires_grad=True), new(c, requires_grad=True)
    nbytes = x.nbytes
    yield "layer_norm", impls["layer_norm"], (x, weight, bias, 1e-6, residual), (
        new(b, n, c), new(b, n, c)), {"fwd": 4 * nbytes, "fwd+bwd": 8 * nbytes}, "GB/s"
    hidden = new(b, n, 4 * c, requires_grad=True)
    bias4 = new(4 * c, requires_grad=True)
    yield "bias_gelu", impls["bias_gelu"], (hidden, bias4), (new(b, n, 4 * c),), {
        "fwd": 2 * hidden.nbytes, "fwd+bwd": 5 * hidden.nbytes}, "GB/s"


def _implementations(cfg: Settings) -> dict[str, dict[str, Callable]]:
    from deit_fast import kernels

    def compiled(fn: Callable) -> Callable:
        return torch.compile(fn, backend=cfg.compile_backend)

    attention = {"triton": kernels.attention, "eager": kernels.attention_reference}
    attention.update({f"sdpa_{name}": partial(_sdpa, backend=b)
                      for name, b in SDPA_BACKENDS.items()})
    attention["compile"] = compiled(kernels.attention_reference)
    return {
        "attention": attention,
        "layer_norm": {"triton": kernels.layer_norm, "eager": kernels.layer_norm_reference,
                       "compile": compiled(kernels.layer_norm_reference)},
        "bias_gelu": {"triton": kernels.bias_gelu, "eager": kernels.bias_gelu_reference,
                      "compile": compiled(kernels.bias_gelu_reference)},
    }


def _measure(cfg: Settings, shapes: list[Shape], peaks: dict[str, float],
             on_row: Callable[[dict], None], deadline: float) -> list[dict]:
    rows = []
    impls = _implementations(cfg)
    for shape in shapes:
        if time.monotonic() > deadline:
            print(f"skip {shape.model} N={shape.seq_len}: time budget spent")
            continue
        for op, op_impls, inputs, grads, work, unit in _cases(shape, cfg, impls):
            for impl, fn in op_impls.items():
                for pass_ in PASSES:
                    run = _runner(fn, inputs, grads, pass_)
                    try:
                        ms = _median_ms(run, cfg)
                    except RuntimeError as err:  # an SDPA backend that cannot take this input
                        print(f"skip {op} {impl} {pass_} {shape.model} N={shape.seq_len}: "
                              f"{str(err).splitlines()[0]}")
                        continue
                    rate = work[pass_] / ms / (1e9 if unit == "TFLOP/s" else 1e6)
                    peak = peaks["matmul_tflops" if unit == "TFLOP/s" else "copy_gbps"]
                    rows.append({
                        "op": op, "model": shape.model, "batch": shape.batch,
                        "seq_len": shape.seq_len, "num_heads": shape.num_heads,
                        "head_dim": shape.head_dim, "dtype": str(cfg.dtype).split(".")[-1],
                        "impl": impl, "pass": pass_, "median_ms": round(ms, 4),
                        "rate": float(f"{rate:.4g}"), "unit": unit,
                        "peak_fraction": float(f"{rate / peak:.3g}"),
                    })
                    on_row(rows[-1])
    return rows


def _targets(rows: list[dict]) -> list[str]:
    """The issue's targets at DeiT-S/B shapes, forward+backward, as PASS/MISS lines."""
    lines = []
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["model"] in ("DeiT-S", "DeiT-B") and r["pass"] == "fwd+bwd":
            by_key.setdefault((r["op"], r["model"], r["seq_len"]), {})[r["impl"]] = r
    for (op, model, seq_len), impls in sorted(by_key.items()):
        if "triton" not in impls:
            continue
        triton_row = impls["triton"]
        where = f"{op} {model} N={seq_len}"
        if op == "attention":
            sdpa = [r for name, r in impls.items() if name.startswith("sdpa_")]
            if sdpa:
                best = min(sdpa, key=lambda r: r["median_ms"])
                speedup = best["median_ms"] / triton_row["median_ms"]
                lines.append(f"{'PASS' if speedup >= 1.2 else 'MISS'} {where}: {speedup:.2f}x "
                             f"best SDPA ({best['impl']}), target 1.2x")
            continue
        if op == "layer_norm" and "eager" in impls:
            speedup = impls["eager"]["median_ms"] / triton_row["median_ms"]
            lines.append(f"{'PASS' if speedup >= 1.5 else 'MISS'} {where}: {speedup:.2f}x "
                         "torch add + LayerNorm, target 1.5x")
        frac = triton_row["peak_fraction"]
        lines.append(f"{'PASS' if frac >= 0.8 else 'MISS'} {where}: {frac:.0%} of copy "
                     "bandwidth, target 80%")
    return lines


def _table(rows: list[dict]) -> str:
    eager_ms = {(r["op"], r["model"], r["seq_len"], r["pass"]): r["median_ms"]
                for r in rows if r["impl"] == "eager"}
    header = f"{'op':<11}{'model':<9}{'N':>5} {'pass':<8}{'impl':<15}{'ms':>9}" \
             f"{'rate':>10} {'unit':<8}{'peak':>6}{'vs eager':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        base = eager_ms.get((r["op"], r["model"], r["seq_len"], r["pass"]))
        speedup = f"{base / r['median_ms']:.2f}x" if base else ""
        lines.append(f"{r['op']:<11}{r['model']:<9}{r['seq_len']:>5} {r['pass']:<8}"
                     f"{r['impl']:<15}{r['median_ms']:>9.3f}{r['rate']:>10.1f} {r['unit']:<8}"
                     f"{r['peak_fraction']:>6.0%}{speedup:>9}")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), 1, figsize=(16, 4 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        op_rows = [r for r in rows if r["op"] == op]
        groups = list(dict.fromkeys(f"{r['model']} N={r['seq_len']}\n{r['pass']}"
                                    for r in op_rows))
        impls = list(dict.fromkeys(r["impl"] for r in op_rows))
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            values = {f"{r['model']} N={r['seq_len']}\n{r['pass']}": r["peak_fraction"]
                      for r in op_rows if r["impl"] == impl}
            xs = [g + i * width for g, name in enumerate(groups) if name in values]
            ax.bar(xs, [values[name] for name in groups if name in values], width, label=impl)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=8)
        unit = "matmul TFLOP/s" if op == "attention" else "copy GB/s"
        ax.set_ylabel(f"fraction of {unit}")
        ax.set_title(op)
        ax.legend(fontsize=8, ncol=len(impls))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU under the Triton interpreter (for CI)")
    add_out_argument(parser, "the CSV, JSON and PNG")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no new shape after this many seconds; rows so far are kept")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s

    on_cuda = cuda_or_smoke("kernel_bench.py", args.smoke, "tiny shapes")
    if on_cuda is None:
        return 2
    from deit_fast import kernels

    device = torch.device("cuda" if on_cuda else "cpu")
    runnable, why = kernels.triton_runnable(device)
    if not runnable:
        print(f"benchmarks/kernel_bench.py: Triton cannot run here: {why}", file=sys.stderr)
        return 2
    cfg = Settings(device=device, dtype=torch.bfloat16 if on_cuda else torch.float32,
                   warmup=1 if args.smoke else 5, reps=2 if args.smoke else 30,
                   compile_backend="inductor" if on_cuda else "eager")
    name = device_name(device)
    peaks = _peaks(cfg, args.smoke)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kernels_{file_stem(name, args.smoke)}"
    Path(f"{stem}.csv").unlink(missing_ok=True)

    def append(row: dict) -> None:  # one row at a time: a run cut short keeps what it measured
        new = not Path(f"{stem}.csv").exists()
        with open(f"{stem}.csv", "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    rows = _measure(cfg, _shapes(args.smoke), peaks, append, deadline)
    targets = [] if args.smoke else _targets(rows)
    meta = {
        **run_meta(name, "kernel_bench.py", argv),
        "dtype": str(cfg.dtype), "compile_backend": cfg.compile_backend,
        "warmup": cfg.warmup, "reps": cfg.reps,
        "peak_copy_gbps": round(peaks["copy_gbps"], 1),
        "peak_matmul_tflops": round(peaks["matmul_tflops"], 1),
        "targets": targets,
    }
    Path(f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    _plot(rows, Path(f"{stem}.png"), f"deit-fast kernels on {name}, {meta['date']}")

    print(f"{name} | torch {meta['torch']} | triton {meta['triton']} | "
          f"copy {peaks['copy_gbps']:.0f} GB/s | matmul {peaks['matmul_tflops']:.1f} TFLOP/s")
    print(wrote(args.out, [f"{stem.name}.{ext}" for ext in ("csv", "json", "png")]))
    for line in targets:
        print(line)
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
