"""Where a training step's time must go: the bytes and FLOPs of every op of one step, and
the time bound they set on an H100 and an H200, for each kernel setting. No GPU needed.

For one `Trainer.train_step` (Mixup/CutMix, bf16 autocast forward, loss, backward, the
non-finite guard, fused AdamW, EMA) of DeiT-Ti/S/B and their distilled forms at 224 px,
batch 256, each setting's kernels (resolved by deit_fast.ops.resolve_kernels) are counted
op by op: FLOPs, bytes read and written (benchmarks/traffic_count.py says how, and what
is charged). Settings: torch-eager and torch (SDPA) without Triton, triton (every Triton
op), and each Triton op alone.

The bound of a step is the sum over its ops of max(FLOPs / peak, bytes / bandwidth), and
img/s = batch / bound, at the HARDWARE figures below. It ignores launch overheads and gaps
between kernels, caches (every byte at an op's boundary crosses HBM once, and nothing
twice inside an op, though the attention backward's two kernels and the reductions'
partial sums re-read some) and the CUDA cores' FLOPs (elementwise ops are charged bytes
only). It includes the optimizer's fp32 traffic and the matmuls that kernels recompute.
A real step of the same ops can only be slower; torch.compile may fuse more.

    python benchmarks/traffic.py [--models tiny,small,...] [--settings torch,triton,...]
                                 [--batch 256] [--out DIR]
    python benchmarks/traffic.py --compare STEP_CSV [--bounds CSV]
    (or: deit-fast bench traffic ...)

Writes traffic.csv (one row per model and setting), traffic_ops.csv (per op, family and
pass), traffic.md and traffic_families.png (bytes per op family, torch against Triton) to
--out, and prints the table last; the whole run takes about a minute on one CPU core.
--compare prints a step benchmark's img/s beside the bound of the same kernels on the
same GPU, read from the committed table (scripts/gpu_check.sh runs it).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))  # the repository, not benchmarks/

from benchmarks import step as step_bench  # noqa: E402
from benchmarks.run_info import add_out_argument, run_meta, wrote  # noqa: E402
from benchmarks.traffic_count import FAMILIES, OpCount, count_step  # noqa: E402
from deit_fast import commit, cpu_name  # noqa: E402
from deit_fast.flops import KNOWN_PEAK_TFLOPS  # noqa: E402
from deit_fast.ops import KernelChoice, resolve_kernels  # noqa: E402

BATCH = 256
# key: (dense bf16 TFLOP/s, HBM TB/s, where the figures come from)
HARDWARE = {
    "h100": (KNOWN_PEAK_TFLOPS["H100"], 3.35,
             "H100 SXM: 989.4 TFLOP/s dense bf16, 3.35 TB/s HBM3 (NVIDIA H100 datasheet)"),
    "h200": (KNOWN_PEAK_TFLOPS["H200"], 4.8,
             "H200: 989.4 TFLOP/s dense bf16, 4.8 TB/s HBM3e (NVIDIA H200 datasheet)"),
    "h200_790": (790.0, 4.8, "H200 at 790 TFLOP/s, the bf16 matmul rate measured on this "
                             "workplace's H200, and 4.8 TB/s"),
}
# benchmarks/step.py's models, then each with a distillation token
MODELS = {**step_bench.MODELS, "tiny_distilled": "deit_tiny_distilled_patch16_224",
          "small_distilled": "deit_small_distilled_patch16_224",
          "base_distilled": "deit_base_distilled_patch16_224"}
# setting -> kernels.attention, kernels.layernorm, kernels.gelu
SETTINGS = {"torch-eager": ("eager", "torch", "torch"), "torch": ("sdpa", "torch", "torch"),
            "triton": ("triton", "triton", "triton"),
            "triton-attention": ("triton", "torch", "torch"),
            "triton-layernorm": ("sdpa", "triton", "torch"),
            "triton-gelu": ("sdpa", "torch", "triton")}


def setting_kernels(name: str) -> KernelChoice:
    """The setting's kernels, resolved for the device they would run on here."""
    return resolve_kernels(*SETTINGS[name], device="cuda" if torch.cuda.is_available()
                           else "cpu")


def bound_ms(ops: list[OpCount], hardware: str) -> float:
    peak, bandwidth, _ = HARDWARE[hardware]
    return sum(max(o.flops / (peak * 1e12), (o.read + o.written) / (bandwidth * 1e12))
               for o in ops) * 1e3


def family_key(family: str) -> str:
    return "gb_" + family.replace(" & ", "_").replace(" ", "_")


def label(model_key: str) -> str:
    size, _, distilled = model_key.partition("_")
    return step_bench.LABELS[size] + (" distilled" if distilled else "")


def summary_row(model_key: str, setting: str, ops: list[OpCount], batch: int) -> dict:
    """The CSV row of one model and setting."""
    row = {"model": label(model_key), "setting": setting,
           "kernels": step_bench.describe_kernels(setting_kernels(setting)), "batch": batch,
           "gb_per_step": round(sum(o.read + o.written for o in ops) / 1e9, 3),
           "gb_read": round(sum(o.read for o in ops) / 1e9, 3),
           "matmul_tflop_per_step": round(sum(o.flops for o in ops) / 1e12, 4)}
    for hw in HARDWARE:
        ms = bound_ms(ops, hw)
        row[f"bound_ms_{hw}"] = round(ms, 3)
        row[f"img_per_s_{hw}"] = round(batch / ms * 1e3)
    for family in FAMILIES:
        row[family_key(family)] = round(
            sum(o.read + o.written for o in ops if o.family == family) / 1e9, 3)
    return row


def op_rows(model_key: str, setting: str, ops: list[OpCount]) -> list[dict]:
    """Per (op, family, pass): calls, FLOPs, bytes and the H200 bound of those calls."""
    groups: dict[tuple, list[OpCount]] = defaultdict(list)
    for o in ops:
        groups[(o.op, o.family, "backward" if o.backward else "forward")].append(o)
    return [{"model": label(model_key), "setting": setting, "op": op, "family": family,
             "pass": phase, "calls": len(g), "gflop": round(sum(o.flops for o in g) / 1e9, 3),
             "mb_read": round(sum(o.read for o in g) / 1e6, 3),
             "mb_written": round(sum(o.written for o in g) / 1e6, 3),
             "bound_ms_h200": round(bound_ms(g, "h200"), 4)}
            for (op, family, phase), g in sorted(groups.items())]


def count_all(models: list[str], settings: list[str], batch: int
              ) -> tuple[list[dict], list[dict]]:
    """(one row per model and setting, one row per op of each), printing as it goes."""
    rows, ops_rows = [], []
    for model_key in models:
        for setting in settings:
            ops = count_step(MODELS[model_key], setting_kernels(setting), batch)
            rows.append(summary_row(model_key, setting, ops, batch))
            ops_rows += op_rows(model_key, setting, ops)
            r = rows[-1]
            print(f"{r['model']:<18}{setting:<18}{r['gb_per_step']:>8.2f} GB"
                  f"{r['img_per_s_h100']:>8} img/s H100{r['img_per_s_h200']:>8} img/s H200",
                  flush=True)
    return rows, ops_rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown(rows: list[dict], meta: dict) -> str:
    head = ("| model | setting | GB/step | matmul TFLOP/step | H100 ms | H100 img/s | H200 ms "
            "| H200 img/s | H200@790 ms | H200@790 img/s |")
    lines = [
        "# One training step: its bytes and FLOPs, and the time bound they set",
        "",
        f"`{meta['command']}`: commit {meta['commit']}, {meta['date']}, {meta['device']}; "
        f"torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}. Counted "
        "with fake tensors (benchmarks/traffic_count.py): no GPU ran, nothing was timed.",
        "",
        f"One `Trainer.train_step` at batch {rows[0]['batch']}, 224 px, bf16 autocast: "
        "Mixup/CutMix, forward, loss (the distilled models: hard distillation from cached "
        "teacher targets), backward, non-finite guard, fused AdamW, EMA. Bound = sum over "
        "ops of max(FLOPs / peak, bytes / bandwidth); img/s = batch / bound. It ignores "
        "launch overheads, caches (each byte at an op's boundary crosses HBM once) and "
        "CUDA-core FLOPs; it includes the optimizer's fp32 traffic and the matmuls that "
        "attention backwards recompute. A real step of these ops can only be slower. Figures:",
        "",
        *[f"- {source}" for _, _, source in HARDWARE.values()],
        "", head, "|---" * head.count(" | ") + "|---|",
    ]
    lines += [f"| {r['model']} | {r['setting']} | {r['gb_per_step']:.2f} | "
              f"{r['matmul_tflop_per_step']:.3f} | {r['bound_ms_h100']:.2f} | "
              f"{r['img_per_s_h100']} | {r['bound_ms_h200']:.2f} | {r['img_per_s_h200']} | "
              f"{r['bound_ms_h200_790']:.2f} | {r['img_per_s_h200_790']} |" for r in rows]
    lines += ["", "## Where the bytes go (GB per step)", "",
              "| model | setting | " + " | ".join(FAMILIES) + " |",
              "|---|---|" + "---|" * len(FAMILIES)]
    lines += [f"| {r['model']} | {r['setting']} | "
              + " | ".join(f"{r[family_key(f)]:.2f}" for f in FAMILIES) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Bytes per op family, torch against every Triton op, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {}
    for r in rows:
        if r["setting"] in ("torch", "triton") and "distilled" not in r["model"]:
            panels.setdefault(r["model"], []).append(r)
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    for ax, (model, model_rows) in zip(axes[0], panels.items()):
        for i, r in enumerate(model_rows):
            ax.barh([y + 0.4 * i for y in range(len(FAMILIES))],
                    [r[family_key(f)] for f in FAMILIES], 0.4, label=r["setting"])
        ax.set_yticks([y + 0.2 for y in range(len(FAMILIES))], FAMILIES)
        ax.invert_yaxis()
        ax.set_xlabel(f"GB per step at batch {model_rows[0]['batch']}")
        ax.set_title(model)
        ax.legend()
    fig.suptitle("Bytes each op family reads and writes in one training step (counted)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(step_csv: Path, bounds_csv: Path) -> str:
    """A step benchmark's img/s beside the bound of the same model, kernels and GPU."""
    with open(bounds_csv) as f:
        bounds = {(r["model"], r["kernels"]): r for r in csv.DictReader(f)}
    with open(step_csv) as f:
        measured = list(csv.DictReader(f))
    device = json.loads(step_csv.with_suffix(".json").read_text())["device"]
    gpu = next((key for key in ("h100", "h200") if key.upper() in device), None)
    source = HARDWARE[gpu][2] if gpu else "none for this device (the table has H100, H200)"
    width = max([8, *(len(r["model"]) + 1 for r in measured)])
    lines = [f"bounds: {bounds_csv}, {source}; measured: {step_csv.name} on {device}; "
             "compiled rows may pass the bound (it counts the uncompiled ops)",
             f"{'model':<{width}}{'setting':<26}{'batch':>6}{'img/s':>9}{'bound':>9}"
             f"{'of bound':>9}"]
    for r in measured:
        bound = bounds.get((r["model"], r["kernels"])) if gpu else None
        limit = bound[f"img_per_s_{gpu}"] if bound and r["batch"] == bound["batch"] else ""
        share = f"{float(r['img_per_s']) / float(limit):.0%}" if limit and r["img_per_s"] \
            else ""
        status = "" if r["status"] == "ok" else f"  {r['status'][:60]}"
        lines.append(f"{r['model']:<{width}}{r['setting']:<26}{r['batch']:>6}{r['img_per_s']:>9}"
                     f"{limit:>9}{share:>9}{status}")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help="comma-separated, from: " + ", ".join(SETTINGS))
    parser.add_argument("--batch", type=int, default=BATCH, help="images per step")
    add_out_argument(parser, "the tables and the chart")
    parser.add_argument("--compare", type=Path, metavar="STEP_CSV",
                        help="print this step benchmark CSV's img/s beside the bounds, and exit")
    parser.add_argument("--bounds", type=Path, default=_HERE / "results" / "traffic.csv",
                        help="the bounds --compare reads (default: the committed table)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for flag, given, accepted in (("--models", args.models, MODELS),
                                  ("--settings", args.settings, SETTINGS)):
        unknown = [v for v in given if v not in accepted]
        if unknown or not given:
            parser.error(f"{flag}: {unknown or 'none given'}; accepted: {', '.join(accepted)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.compare:
        print(compare(args.compare, args.bounds))
        return 0
    meta = run_meta(f"{cpu_name()}, {os.cpu_count()} cores", "traffic.py", argv)
    meta["commit"] = commit(dirty=True)
    rows, ops_rows = count_all(args.models, args.settings, args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "traffic.csv")
    write_csv(ops_rows, args.out / "traffic_ops.csv")
    table = markdown(rows, meta)
    (args.out / "traffic.md").write_text(table)
    plot(rows, args.out / "traffic_families.png")
    print(wrote(args.out, ["traffic.csv", "traffic_ops.csv", "traffic.md",
                           "traffic_families.png"]))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
