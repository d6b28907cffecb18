"""benchmarks/kernel_bench.py --smoke runs end to end (tiny shapes, Triton interpreter on CPU)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_bench.py"


def test_smoke_run_writes_csv_json_and_plot(tmp_path: Path) -> None:
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    with open(tmp_path / "kernels_smoke.csv") as f:
        rows = list(csv.DictReader(f))
    ran = {(r["op"], r["impl"], r["pass"]) for r in rows}
    for op in ("attention", "layer_norm", "bias_gelu"):
        for impl in ("triton", "eager", "compile"):
            assert {(op, impl, "fwd"), (op, impl, "fwd+bwd")} <= ran
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert {r["model"] for r in rows} == {"smoke"}  # no DeiT's name on a tiny shape
    meta = json.loads((tmp_path / "kernels_smoke.json").read_text())
    assert {"device", "torch", "triton", "date", "command"} <= meta.keys()
    assert (tmp_path / "kernels_smoke.png").stat().st_size > 0
    assert done.stdout.rstrip().splitlines()[-1].startswith("bias_gelu")  # the table comes last


def test_the_shapes_with_targets_run_first() -> None:
    from benchmarks.kernel_bench import _shapes

    assert [s.model for s in _shapes(smoke=False)] == ["DeiT-S", "DeiT-S", "DeiT-B", "DeiT-B",
                                                       "DeiT-Ti", "DeiT-Ti"]
