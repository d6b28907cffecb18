"""benchmarks/data_stages.py runs end to end on a few generated JPEGs (numbers not checked:
speed belongs to benchmarks, not tests)."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nvidia.dali")

from deit_fast.data_pipeline.plan import RA_OPS  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "data_stages.py"


def test_stage_table_has_every_stage_and_op(tmp_path):
    args = ["--images", "128", "--batch-size", "16", "--batches", "1", "--rounds", "1",
            "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "data_stages.csv") as f:
        rows = {row["stage"]: row for row in csv.DictReader(f)}
    expected = ["decode the crop", "resize to 224, bicubic", "whole pipeline"]
    expected += [f"RandAugment {name}" for name in RA_OPS[1:]]
    for stage in expected:
        assert math.isfinite(float(rows[stage]["pil_ms"])), stage
        assert math.isfinite(float(rows[stage]["dali_cpu_ms"])), stage
    assert float(rows["whole pipeline"]["pil_ms"]) > 0
    assert float(rows["whole pipeline"]["dali_cpu_ms"]) > 0
