"""scripts/gpu_check.sh --dry-run on the CPU: the smoke stages run, the GPU ones are skipped
with a reason, and the summary is written and printed last. Also checks the CSVs of the
step and decode benchmarks' smoke modes, which the dry run produces.

The kernel stage is skipped here (--skip): tests/test_bench_kernels_smoke.py runs it.
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"
STAGES = ["env", "tests", "kernels", "decode", "train", "step"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run", "--skip", "kernels"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_summary_names_every_stage_and_why_it_was_skipped(dry_run: tuple[Path, str]) -> None:
    out, stdout = dry_run
    summary = {r["stage"]: r for r in csv.DictReader(open(out / "summary.tsv"), delimiter="\t")}
    assert list(summary) == STAGES
    status = {stage: r["status"] for stage, r in summary.items()}
    assert status == {"env": "PASS", "tests": "SKIP", "kernels": "SKIP", "decode": "PASS",
                      "train": "PASS", "step": "PASS"}
    assert "needs a CUDA GPU" in summary["tests"]["note"]
    assert "--skip" in summary["kernels"]["note"]
    assert all(r["seconds"].isdigit() for r in summary.values())

    assert "DRY RUN (--dry-run given)" in stdout
    assert "skipped: tests (needs a CUDA GPU" in stdout
    assert "skipped: kernels (skipped with --skip)" in stdout
    printed = stdout.rstrip().splitlines()
    assert printed[-1].startswith("step ") and printed[-7].startswith("stage ")  # table last
    assert (out / "summary.txt").read_text().rstrip().splitlines()[-7:] == printed[-7:]
    for stage in STAGES:
        assert (out / f"{stage}.log").is_file()


@pytest.mark.slow
def test_step_smoke_writes_every_row(dry_run: tuple[Path, str]) -> None:
    out, _ = dry_run
    rows = {r["setting"]: r for r in _csv(out / "step_smoke.csv")}
    assert list(rows) == ["ours triton", "ours torch", "timm eager", "ours triton compiled",
                          "timm compiled", "ours triton attention", "ours triton layernorm",
                          "ours triton gelu"]  # in priority order
    for name, row in rows.items():
        assert row["model"] == "DeiT-Ti" and row["batch"] == "2"
        if name == "ours triton compiled":  # compile cannot trace interpreted Triton ops
            assert row["status"].startswith("skipped:") and row["img_per_s"] == ""
            continue
        assert row["status"] == "ok", (name, row["status"])
        assert float(row["img_per_s"]) > 0 and float(row["mfu"]) > 0
    assert rows["timm eager"]["speedup_vs_timm_eager"] == "1.0"
    meta = json.loads((out / "step_smoke.json").read_text())
    assert {"device", "torch", "triton", "timm", "date", "command", "peak_matmul_tflops",
            "train_flops_per_image"} <= meta.keys()
    # The docstring's count for the smoke model (C=192, one block, 32 px: P=4, N=5, H=768):
    patch = 2 * 4 * 3 * 16**2 * 192
    forward = patch + 2 * 5 * 192 * (4 * 192 + 2 * 768) + 4 * 5**2 * 192 + 2 * 192 * 1000
    assert meta["train_flops_per_image"] == {"DeiT-Ti": 3 * forward - patch}
    assert (out / "step_smoke.png").stat().st_size > 0


@pytest.mark.slow
def test_decode_smoke_and_dry_training_outputs(dry_run: tuple[Path, str]) -> None:
    out, _ = dry_run
    status = {r["backend"]: r["status"] for r in _csv(out / "decode_smoke.csv")}
    assert status["pil"] == status["pil-threads"] == status["torchvision-cpu"] == "ok"
    assert status["torchvision-cuda"] == status["cuda+resize224"] == "skipped: no CUDA GPU"

    records = [json.loads(line) for line in open(out / "train_metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    for args in ([], [str(tmp_path), "--skip", "nonsense"], [str(tmp_path), "--budget", "step"]):
        done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2 and done.stderr, args
