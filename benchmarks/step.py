"""Training-step benchmark: deit-fast's DeiT with each kernel setting against timm's model.

Every row times `Trainer.train_step`, the trainer's own step (Mixup/CutMix, bf16 autocast
forward, soft-target cross-entropy and the --distill loss, backward, the non-finite guard
on the gradients, fused AdamW with the DeiT parameter groups, EMA), on a batch already on
the GPU, at 224 px and batch 256 per GPU; timm's model goes through the same Trainer.
Rows, all in one run, for each of DeiT-Ti/S/B: ours with every Triton op, with torch/SDPA
only (torch's default SDPA backend, then each of cuDNN, flash and memory-efficient forced
with torch.nn.attention.sdpa_kernel: a backend that cannot run fails its own row), with
each Triton op alone, ours (all Triton) with train.compile=default, timm's same
model eager (fused_attn on, timm's default) and timm compiled; with --cuda-graphs also ours
(all Triton) with train.cuda_graphs. Columns: img/s (median of the timed steps after
warm-up, CUDA events), MFU against a bf16 matmul peak measured in the same run, peak
memory, and speed-up over timm eager. A row that fails (OOM, compile error, a host sync
under --sync-debug) is recorded with its error; the run goes on.

    python benchmarks/step.py [--models tiny,small,base] [--steps 30] [--warmup 10]
                              [--batch 256] [--max-batch] [--budget-s S] [--out DIR]
                              [--distill none|soft|hard] [--cuda-graphs] [--sync-debug]
    (or: deit-fast bench step ...)

--sync-debug times the steps under torch.cuda.set_sync_debug_mode("error"): a step that
waits for the GPU fails its row. Writes step_<device>.csv (after every row, so a killed run
keeps what it measured), a .json sidecar (device, versions, date, command, peak, FLOPs,
targets) and a .png bar chart (when matplotlib is importable) to --out, and prints the
table last. --smoke runs DeiT-Ti's width with one block at 32 px on the CPU (Triton under
the interpreter, fp32), its rows labelled so: its numbers mean nothing, it keeps the script
working in CI.

FLOPs per image of a training step: deit_fast/flops.py (the count the trainer logs MFU
with); timm's model is the same network, so the same count is used for it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.nn.attention import sdpa_kernel

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
from deit_fast import flops as step_flops  # noqa: E402
from deit_fast.config import load_config  # noqa: E402
from deit_fast.losses import DISTILL_TYPES, DistillationLoss  # noqa: E402
from deit_fast.models import create_model  # noqa: E402
from deit_fast.ops import KernelChoice  # noqa: E402
from deit_fast.resolve import build_mixup  # noqa: E402
from deit_fast.teacher import TeacherTargets  # noqa: E402
from deit_fast.train import Trainer  # noqa: E402

MODELS = {"tiny": "deit_tiny_patch16_224", "small": "deit_small_patch16_224",
          "base": "deit_base_patch16_224"}
LABELS = {"tiny": "DeiT-Ti", "small": "DeiT-S", "base": "DeiT-B"}
SMOKE = {"img_size": 32, "depth": 1}  # --smoke's model: DeiT-Ti's width, one block, 32 px
SMOKE_LABEL = "smoke: 1 block, 32 px"
TRITON = KernelChoice("triton", "triton", "triton")
DROP_PATH = 0.1  # the recipe's stochastic depth, for ours and timm alike
EMA_DECAY = 0.99996
MAX_BATCH = 16384  # where --max-batch stops doubling even if it still fits (8 in smoke)


@dataclass(frozen=True)
class Setting:
    name: str
    source: str  # ours | timm
    kernels: KernelChoice | None  # None for timm
    compiled: bool
    priority: int  # rows run in this order, so that --budget-s cuts the least needed ones
    cuda_graphs: bool = False  # only with --cuda-graphs
    sdpa_backend: str | None = None  # forced for the whole row; None: torch's own choice


SETTINGS = [
    Setting("ours triton", "ours", TRITON, False, 0),
    Setting("ours torch", "ours", KernelChoice("sdpa", "torch", "torch"), False, 0),
    Setting("ours triton attention", "ours", KernelChoice("triton", "torch", "torch"), False, 2),
    Setting("ours triton layernorm", "ours", KernelChoice("sdpa", "triton", "torch"), False, 2),
    Setting("ours triton gelu", "ours", KernelChoice("sdpa", "torch", "triton"), False, 2),
    Setting("timm eager", "timm", None, False, 0),
    # torch's default SDPA backend changes between versions: each one, forced
    *(Setting(f"ours sdpa {b}", "ours", KernelChoice("sdpa", "torch", "torch"), False, 1,
              sdpa_backend=b) for b in ("cudnn", "flash", "efficient")),
    Setting("ours triton compiled", "ours", TRITON, True, 1),  # slow to compile: late
    Setting("timm compiled", "timm", None, True, 1),
    Setting("ours triton cuda graphs", "ours", TRITON, False, 1, cuda_graphs=True),
]
BASELINE = "timm eager"


@dataclass
class Run:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: fp32, no autocast
    steps: int
    warmup: int
    overrides: dict[str, Any] = field(default_factory=dict)  # model shape changes (smoke)
    distill: str = "none"
    sync_debug: bool = False


def model_label(model_key: str, run: Run) -> str:
    """The rows' model: DeiT-Ti/S/B, or the smoke label for a model cut down to SMOKE."""
    return SMOKE_LABEL if run.overrides == SMOKE else LABELS[model_key]


def train_flops_per_image(name: str, overrides: dict[str, Any]) -> float:
    """deit_fast.flops' count, read off the model's shapes (built on the meta device)."""
    with torch.device("meta"):
        model = create_model(name, **overrides)
    return step_flops.train_flops_per_image(model)


def _build(setting: Setting, name: str, run: Run) -> nn.Module:
    if setting.source == "ours":
        model = create_model(name, kernels=setting.kernels, drop_path_rate=DROP_PATH,
                             **run.overrides)
    else:
        import timm

        model = timm.create_model(name, pretrained=False, drop_path_rate=DROP_PATH,
                                  **run.overrides)
        if not all(block.attn.fused_attn for block in model.blocks):
            raise RuntimeError("timm's fused_attn is off (is TIMM_FUSED_ATTN set?)")
    return model.to(run.device)


class _Batches:
    """The trainer's loader seam over one batch already on the device."""

    def __init__(self, batch: SimpleNamespace) -> None:
        self.batch, self.steps_per_epoch, self.bad_files = batch, 1000, set()
        self.items_per_step = len(batch.images)

    def epoch(self, epoch: int, start_step: int = 0, start_item: int | None = None):
        yield from (self.batch for _ in range(start_step, self.steps_per_epoch))


def build_trainer(model: nn.Module, name: str, setting: Setting, batch: int, run: Run,
             run_dir: str) -> tuple[Trainer, SimpleNamespace]:
    """The recipe's Trainer (mixup 0.8, cutmix 1.0, EMA, --distill) around `model`."""
    cfg = load_config(None, [
        f"model.name={name}", f"data.batch_size={batch}", f"distill.type={run.distill}",
        "distill.source=cache", "distill.cache_dir=random-targets",
        f"train.precision={'bf16' if run.amp_dtype else 'fp32'}",
        f"train.device={run.device.type}", f"train.ema_decay={EMA_DECAY}",
        f"train.compile={'default' if setting.compiled else 'none'}",
        f"train.cuda_graphs={setting.cuda_graphs}", "train.progress=false",
        f"train.output_dir={run_dir}"])
    size = run.overrides.get("img_size", 224)  # every benchmarked model is a 224 px one
    classes = model.num_classes
    # a cache's top-5 log-probabilities of the mixed batch, as the loader's batches carry them
    top = torch.log_softmax(torch.randn(batch, classes, device=run.device), -1).topk(5, dim=-1)
    data = SimpleNamespace(
        images=torch.randn(batch, 3, size, size, device=run.device),
        labels=torch.randint(0, classes, (batch,), device=run.device),
        teacher_values=top.values.half(), teacher_indices=top.indices)
    mix = build_mixup(cfg.data, classes)
    criterion = DistillationLoss(cfg.distill.type, cfg.distill.alpha, cfg.distill.tau)
    trainer = Trainer(cfg, model, _Batches(data), None, criterion, mix, run.device, run_dir,
                      teacher_targets=TeacherTargets(run.distill, cfg.distill.tau, classes,
                                                     cache_mode=cfg.distill.cache_mode)
                      if run.distill != "none" else None)
    return trainer, data


def advancing_step(trainer: Trainer, data: SimpleNamespace) -> Callable[[], None]:
    """Trainer.train_step as fit() calls it, the step's position advancing (mixup draws)."""

    def step() -> None:
        trainer.train_step(data)
        trainer.step_in_epoch = (trainer.step_in_epoch + 1) % trainer.train_loader.steps_per_epoch

    return step


def _step_times_ms(step: Callable[[], None], run: Run) -> list[float]:
    for _ in range(run.warmup):  # the first steps also compile, autotune and capture
        step()
    if run.device.type != "cuda":
        times = []
        for _ in range(run.steps):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    torch.cuda.synchronize()
    events = []
    torch.cuda.set_sync_debug_mode("error" if run.sync_debug else "default")
    try:
        for _ in range(run.steps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            events.append((start, end))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def _measure(setting: Setting, model_key: str, batch: int, run: Run) -> dict[str, Any]:
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    model = _build(setting, MODELS[model_key], run)
    backend = sdpa_kernel(SDPA_BACKENDS[setting.sdpa_backend]) if setting.sdpa_backend \
        else contextlib.nullcontext()
    with backend, tempfile.TemporaryDirectory(prefix="deit-fast-step-") as run_dir:
        trainer, data = build_trainer(model, MODELS[model_key], setting, batch, run, run_dir)
        try:
            step_ms = statistics.median(_step_times_ms(advancing_step(trainer, data), run))
        finally:
            trainer.close()
    peak = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" \
        else None
    return {"step_ms": step_ms, "img_per_s": batch / step_ms * 1e3, "peak_mem_gib": peak}


def describe_kernels(kernels: KernelChoice | None) -> str:
    """The CSV's kernels column (benchmarks/traffic.py matches its bounds on it)."""
    if kernels is None:
        return "timm VisionTransformer, fused_attn (SDPA)"
    return f"attention={kernels.attention} layernorm={kernels.layernorm} gelu={kernels.gelu}"


def blank_row(setting: Setting, label: str, batch: int, status: str) -> dict[str, Any]:
    """A CSV row with no measurement yet."""
    return {
        "model": label, "setting": setting.name,
        "source": setting.source, "kernels": describe_kernels(setting.kernels),
        "sdpa_backend": setting.sdpa_backend or "default", "compiled": setting.compiled,
        "batch": batch, "img_per_s": "", "step_ms": "", "mfu": "", "peak_mem_gib": "",
        "speedup_vs_timm_eager": "", "status": status,
    }


def measure_row(setting: Setting, model_key: str, batch: int, run: Run, flops: float,
                peak_tflops: float) -> dict[str, Any]:
    """One CSV row; a failure (OOM, compile error...) is recorded in `status`, not raised."""
    row = blank_row(setting, model_label(model_key, run), batch, "ok")
    try:
        result = _measure(setting, model_key, batch, run)
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as err:  # any failing row is reported in the table, not fatal
        row["status"] = f"error: {type(err).__name__}: {str(err).strip().splitlines()[0][:160]}"
    else:
        row.update(img_per_s=round(result["img_per_s"], 1), step_ms=round(result["step_ms"], 3),
                   mfu=round(step_flops.mfu(flops, result["img_per_s"], peak_tflops), 4))
        if result["peak_mem_gib"] is not None:
            row["peak_mem_gib"] = round(result["peak_mem_gib"], 2)
    finally:
        if setting.compiled:
            torch._dynamo.reset()  # frees compiled graphs; the next model is another shape
        gc.collect()
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"{row['model']:<8} {row['setting']:<24}batch {batch:<6}{row['img_per_s']!s:>10} img/s"
          f"  {row['status']}", flush=True)
    return row


def matmul_peak_tflops(run: Run, smoke: bool) -> float:
    """A large bf16 matmul (fp32 and small in smoke mode), timed like the steps."""
    n = 256 if smoke else 8192
    dtype = torch.float32 if smoke else torch.bfloat16
    a = torch.randn(n, n, device=run.device, dtype=dtype)
    b = torch.randn(n, n, device=run.device, dtype=dtype)
    timing = Run(run.device, None, steps=20, warmup=5)
    ms = statistics.median(_step_times_ms(lambda: a @ b, timing))
    return 2 * n**3 / ms / 1e9


def add_speedups(rows: list[dict[str, Any]]) -> None:
    base = {(r["model"], r["batch"]): r["img_per_s"] for r in rows
            if r["setting"] == BASELINE and r["status"] == "ok"}
    for r in rows:
        reference = base.get((r["model"], r["batch"]))
        if reference and r["status"] == "ok":
            r["speedup_vs_timm_eager"] = round(r["img_per_s"] / reference, 3)


def targets(rows: list[dict[str, Any]], batch: int) -> list[str]:
    """The step's targets, for the best of our rows at the main batch, as PASS/MISS lines."""
    ok = {(r["model"], r["setting"]): r["img_per_s"] for r in rows
          if r["status"] == "ok" and r["batch"] == batch}
    lines = []

    def check(passed: bool, text: str) -> None:
        lines.append(f"{'PASS' if passed else 'MISS'} {text}")

    for model, floor in (("DeiT-S", 10_000), ("DeiT-B", 3_000)):
        ours = {s: v for (m, s), v in ok.items() if m == model and s.startswith("ours")}
        if not ours:
            continue
        best_setting = max(ours, key=ours.get)
        best = ours[best_setting]
        check(best >= floor, f"{model} {best:.0f} img/s ({best_setting}), target {floor}")
        if model != "DeiT-S":
            continue
        for baseline, ratio in ((BASELINE, 1.3), ("timm compiled", 1.05)):
            if (model, baseline) in ok:
                speedup = best / ok[(model, baseline)]
                check(speedup >= ratio, f"{model} {speedup:.2f}x {baseline} ({best_setting}), "
                      f"target {ratio}x")
    return lines


def table(rows: list[dict[str, Any]], labels: list[str]) -> str:
    order = {label: i for i, label in enumerate(labels)}
    settings = {s.name: i for i, s in enumerate(SETTINGS)}
    rows = sorted(rows, key=lambda r: (order.get(r["model"], 99), settings[r["setting"]],
                                       r["batch"]))
    width = max([8, *(len(r["model"]) + 1 for r in rows)])
    header = (f"{'model':<{width}}{'setting':<24}{'batch':>6}{'img/s':>10}{'step ms':>9}{'MFU':>7}"
              f"{'peak GiB':>9}{'vs timm':>8}  status")
    lines = [header, "-" * len(header)]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] != "" else ""
        speedup = f"{r['speedup_vs_timm_eager']:.2f}x" if r["speedup_vs_timm_eager"] else ""
        lines.append(f"{r['model']:<{width}}{r['setting']:<24}{r['batch']:>6}{r['img_per_s']!s:>10}"
                     f"{r['step_ms']!s:>9}{mfu:>7}{r['peak_mem_gib']!s:>9}{speedup:>8}  "
                     f"{r['status']}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], batch: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["batch"] == batch]
    models = list(dict.fromkeys(r["model"] for r in rows))
    names = [s.name for s in SETTINGS if any(r["setting"] == s.name for r in rows)]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(8, 3 * len(models)), 5))
    for i, name in enumerate(names):
        values = [next((r["img_per_s"] for r in rows if r["model"] == m and r["setting"] == name
                        and r["status"] == "ok"), 0) for m in models]
        ax.bar([g + i * width for g in range(len(models))], values, width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(models))], models)
    ax.set_ylabel(f"training images/s at batch {batch} (0: failed or not run)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    add_speedups(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,small,base",
                        help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--batch", type=int, default=256, help="images per step (per GPU)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per row first")
    parser.add_argument("--max-batch", action="store_true",
                        help="also double the batch of 'ours triton' and 'timm eager' "
                             "until it no longer fits")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no row after this many seconds (later rows are recorded "
                             "as skipped)")
    parser.add_argument("--distill", choices=DISTILL_TYPES, default="none",
                        help="the distillation loss of every row, on random teacher targets "
                             "(a cache's, already looked up)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also the row of ours (all Triton) with train.cuda_graphs")
    parser.add_argument("--sync-debug", action="store_true",
                        help="time under torch.cuda.set_sync_debug_mode('error'): a host "
                             "sync in a step fails its row")
    parser.add_argument("--smoke", action="store_true",
                        help=f"a one-block model at 32 px on the CPU, Triton interpreted, rows "
                             f"labelled '{SMOKE_LABEL}' (CI)")
    add_out_argument(parser, "the CSV, JSON and PNG")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        parser.error(f"--models: {unknown or 'none given'}; accepted: {', '.join(MODELS)}")
    return args


def _run_rows(args: argparse.Namespace, run: Run, flops: dict[str, float], peak: float,
              csv_path: Path) -> list[dict[str, Any]]:
    """Every row of the run, the CSV rewritten after each one."""
    started = time.monotonic()
    rows: list[dict[str, Any]] = []

    def row(setting: Setting, model_key: str, batch: int) -> str:
        label = model_label(model_key, run)
        if args.budget_s is not None and time.monotonic() - started > args.budget_s:
            result = blank_row(setting, label, batch,
                               f"skipped: time budget (--budget-s {args.budget_s:g})")
        elif setting.cuda_graphs and run.device.type != "cuda":
            result = blank_row(setting, label, batch, "skipped: CUDA graphs need a GPU")
        elif setting.compiled and setting.kernels and run.device.type != "cuda":
            result = blank_row(setting, label, batch, "skipped: torch.compile cannot trace "
                               "interpreted Triton ops (the gpu tests cover it)")
        else:
            result = measure_row(setting, model_key, batch, run, flops[model_key], peak)
        rows.append(result)
        write_csv(rows, csv_path)
        return result["status"]

    # The rows the targets need for every model, then the compiled ones, then the per-op
    # diagnostics; within a priority, models in the order given.
    plan = [(s, m) for s in SETTINGS for m in args.models
            if args.cuda_graphs or not s.cuda_graphs]
    for setting, model_key in sorted(plan, key=lambda p: (p[0].priority,
                                                          args.models.index(p[1]))):
        row(setting, model_key, args.batch)
    if args.max_batch:
        limit = 8 if args.smoke else MAX_BATCH  # a CPU never runs out of memory in time
        for model_key in args.models:
            for setting in (s for s in SETTINGS if s.name in ("ours triton", BASELINE)):
                batch = 2 * args.batch
                while row(setting, model_key, batch) == "ok" and batch < limit:
                    batch *= 2
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    on_cuda = cuda_or_smoke("step.py", args.smoke, "a tiny model")
    if on_cuda is None:
        return 2
    import timm  # imports triton, so only now

    device = torch.device("cuda" if on_cuda else "cpu")
    if args.smoke:
        run = Run(device, None, steps=1, warmup=1, overrides=SMOKE, distill=args.distill)
        args.models, args.batch = args.models[:1], 2
    else:
        # CUDA graphs capture after three eager steps: warm-up covers them
        run = Run(device, torch.bfloat16, args.steps, max(args.warmup, 5), distill=args.distill,
                  sync_debug=args.sync_debug)
    name = device_name(device)
    peak = matmul_peak_tflops(run, args.smoke)
    flops = {m: train_flops_per_image(MODELS[m], run.overrides) for m in args.models}
    meta = {
        **run_meta(name, "step.py", argv),
        "timm": timm.__version__,
        "precision": "bf16 autocast" if run.amp_dtype else "fp32",
        "batch": args.batch, "steps": run.steps, "warmup": run.warmup,
        "compile": "train.compile=default (inductor)", "distill": run.distill,
        "sync_debug": run.sync_debug, "model_overrides": run.overrides,
        "peak_matmul_tflops": float(f"{peak:.4g}"),
        "train_flops_per_image": {model_label(m, run): flops[m] for m in args.models},
    }
    header = (f"{name} | torch {meta['torch']} | triton {meta['triton']} | timm "
              f"{timm.__version__} | {meta['precision']} | batch {args.batch} | matmul peak "
              f"{peak:.3g} TFLOP/s | {meta['date']}")
    print(header, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"step_{file_stem(name, args.smoke)}"
    sidecar = Path(f"{stem}.json")
    sidecar.write_text(json.dumps(meta, indent=2) + "\n")  # now too: a killed run keeps it
    rows = _run_rows(args, run, flops, peak, Path(f"{stem}.csv"))

    meta["targets"] = [] if args.smoke else targets(rows, args.batch)
    written = [f"{stem.name}.csv", sidecar.name]
    if importlib.util.find_spec("matplotlib") is not None:
        plot(rows, args.batch, Path(f"{stem}.png"),
             f"deit-fast training step on {name}, {meta['date']}")
        meta["png"] = f"{stem.name}.png"
        written.append(meta["png"])
    else:
        meta["png"] = "not written: matplotlib is not installed"
    sidecar.write_text(json.dumps(meta, indent=2) + "\n")
    print(wrote(args.out, written))
    for line in meta["targets"]:
        print(line)
    print(header)
    print(table(rows, [model_label(m, run) for m in args.models]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
