"""Run logging: metrics.jsonl (one JSON object per line), TensorBoard events, PNG curves,
and the console (`RunLog`: a progress bar and one line per evaluation, from rank 0).

A run that resumes from step S opens the log at S: records of the interrupted run past S
(logged after its last checkpoint) are dropped from metrics.jsonl, and TensorBoard is told
to purge its events past S, so no step is ever recorded twice. Epochs are numbered from 1
everywhere: in metrics.jsonl, on the console and in the run's summary.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from deit_fast.data_pipeline.files import atomic_write, write_error


def warn_write_failed(err: OSError) -> None:
    warnings.warn(f"{err.strerror or err}; training goes on", stacklevel=2)


class MetricsLog:
    def __init__(self, run_dir: str | Path, start_step: int = 0, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step] \
            if self.path.is_file() else []
        self._rewrite(kept)  # also creates the file: curves can be plotted before the first line
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"),
                                         purge_step=start_step + 1)

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        with atomic_write(self.path, "metrics") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records).encode())

    def log(self, record: dict[str, Any]) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise write_error(err, self.path, "metrics") from err
        if self._writer is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(metrics_path: str | Path, out_png: str | Path) -> None:
    """Training loss and learning rate against step; val top-1 (model and EMA) against epoch.
    Written to a temporary file and renamed: a failed write keeps the previous plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "top1" in r]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    if train:
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
        axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
    for key in ("top1", "ema_top1"):
        points = [(r["epoch"], r[key]) for r in evals if key in r and math.isfinite(r[key])]
        if points:
            axes[2].plot(*zip(*points), marker="o", label=key)
    axes[0].set(title="training loss", xlabel="step")
    axes[1].set(title="learning rate", xlabel="step")
    axes[2].set(title="validation top-1 (%)", xlabel="epoch")
    if evals:
        axes[2].legend()
    fig.tight_layout()
    try:
        with atomic_write(out_png, "plot") as f:
            fig.savefig(f, dpi=100, format="png")
    finally:
        plt.close(fig)

class RunLog:
    """What a run tells, on rank 0 only (elsewhere every call does nothing): a progress bar
    over the run's steps, metrics.jsonl and TensorBoard, one console line per evaluation,
    and curves.png (a failed plot warns and training goes on)."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, epochs: int,
                 progress: bool, main: bool) -> None:
        self.run_dir, self.epochs, self.main = run_dir, epochs, main
        self.metrics = MetricsLog(run_dir, start_step=start_step) if main else None
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                        disable=not (progress and main), dynamic_ncols=True)
        self.plotted_step = -1

    def advance(self) -> None:
        self.bar.update(1)

    def window(self, record: dict[str, Any]) -> None:
        """A log interval's record (its loss, lr, img/s...)."""
        if self.metrics:
            self.metrics.log(record)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 img_s=f"{record['img_per_s']:.0f}")

    def evaluation(self, record: dict[str, Any], best: float) -> None:
        """An evaluation's record, and its line: epoch, top-1, EMA top-1, best so far."""
        if not self.metrics:
            return
        self.metrics.log(record)
        ema = f" (EMA {record['ema_top1']:.2f}%)" if "ema_top1" in record else ""
        self.say(f"epoch {record['epoch']}/{self.epochs}: val top-1 {record['top1']:.2f}%"
                 f"{ema}, best {best:.2f}%")

    def say(self, line: str) -> None:
        """A line on stderr, above the progress bar."""
        if self.main:
            tqdm.write(line, file=sys.stderr)

    def plot(self, step: int) -> None:
        if self.metrics and self.plotted_step != step:
            try:
                plot_curves(self.metrics.path, self.run_dir / "curves.png")
            except OSError as err:
                warn_write_failed(err)
            self.plotted_step = step

    def close(self) -> None:
        self.bar.close()
        if self.metrics:
            self.metrics.close()


class Window:
    """The device sums of a log interval: the loss over finite steps and their count, with
    when it started and the epoch of its last step."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(2, device=device)
        self.reset()

    def add(self, loss: Tensor, bad: Tensor, epoch: int) -> None:
        self.sums += torch.stack([torch.where(bad > 0, 0.0, loss), 1.0 - bad])
        self.steps, self.epoch = self.steps + 1, epoch

    def reset(self) -> None:
        self.sums.zero_()
        self.start, self.steps, self.epoch = time.perf_counter(), 0, 0
