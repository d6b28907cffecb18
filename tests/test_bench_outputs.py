"""Where the benchmarks write: a run without --out leaves benchmarks/results/ as it was,
writes under runs/bench/ of the folder it runs in, and says where; through the command line,
as a user runs it."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def step_smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    """`deit-fast bench step --smoke` with no --out, run from an empty folder."""
    here = tmp_path_factory.mktemp("bench_step")
    before = _files(RESULTS)
    done = subprocess.run([sys.executable, "-m", "deit_fast", "bench", "step", "--smoke"],
                          cwd=here, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return here, done.stdout, before


@pytest.mark.slow
def test_a_smoke_run_writes_under_runs_bench_and_not_into_the_results(step_smoke) -> None:
    here, stdout, before = step_smoke
    assert _files(RESULTS) == before
    out = (here / "runs" / "bench").resolve()
    assert {"step_smoke.csv", "step_smoke.json"} <= set(_files(out))
    assert f"wrote step_smoke.csv, step_smoke.json, step_smoke.png to {out}" in stdout


@pytest.mark.parametrize("script", ["dali_gpu.py", "gpu_decode.py", "data_stages.py"])
def test_every_script_outside_the_command_line_states_the_rule(script: str) -> None:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    help_text = " ".join(done.stdout.split())  # argparse wraps to the terminal's width
    assert "default: runs/bench/" in help_text and "--out benchmarks/results" in help_text


@pytest.mark.slow
def test_smoke_rows_are_labelled_for_the_model_that_ran(step_smoke) -> None:
    here, stdout, _ = step_smoke
    out = here / "runs" / "bench"
    with open(out / "step_smoke.csv") as f:
        models = {row["model"] for row in csv.DictReader(f)}
    assert models == {"smoke: 1 block, 32 px"}
    table = stdout[stdout.index("model "):].splitlines()[2:]  # the table, after its rule
    assert table and all(line.startswith("smoke: 1 block, 32 px ") for line in table)
    meta = json.loads((out / "step_smoke.json").read_text())
    assert list(meta["train_flops_per_image"]) == ["smoke: 1 block, 32 px"]


@pytest.mark.slow
def test_distill_rows_name_the_models_that_ran(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "deit_fast", "bench", "distill", "--classes",
                           "10", "--batch", "4", "--steps", "1", "--warmup", "0", "--out",
                           str(tmp_path)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "distill_cpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["distillation"] for r in rows] == ["none", "hard, cached teacher",
                                                 "hard, online teacher"]
    assert {(r["student"], r["teacher"], r["img_size"], r["batch"], r["precision"])
            for r in rows} == {("deit_micro_distilled_patch4_32", "test_resnet", "32", "4",
                                "fp32")}
