"""Run logging: metrics.jsonl (one JSON object per line), TensorBoard events, PNG curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path.touch()  # the curves can be plotted before the first log line
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
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
    """Training loss and learning rate against step; val top-1 (model and EMA) against epoch."""
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
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
