"""scripts/gpu_check.sh --dry-run on the CPU: the smoke stages run, the GPU ones are skipped
with a reason, and the summary is written and printed last. Also checks the CSVs of the
step, DALI and decode benchmarks' smoke modes, which the dry run produces;
the stage framework on stand-in scripts (a missing script, a failing compile check); and
scripts/unpack_dali.sh on parts that scripts/pack_dali.sh --site made of a small folder.

The compile, kernel and distillation stages are skipped here (--skip), as their own
benchmarks' tests run them; the stand-in repository below runs the stages' framework.
"""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STAGES = ["env", "compile", "tests", "kernels", "dali", "decode", "distill", "train", "step"]
try:
    import nvidia.dali  # noqa: F401

    DALI = True
except ImportError:
    DALI = False


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run", "--skip",
                           "compile,kernels,distill"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.tsv") as f:
        return {r["stage"]: r for r in csv.DictReader(f, delimiter="\t")}


@pytest.mark.slow
def test_summary_names_every_stage_and_why_it_was_skipped(dry_run: tuple[Path, str]) -> None:
    out, stdout = dry_run
    summary = _summary(out)
    assert list(summary) == STAGES
    status = {stage: r["status"] for stage, r in summary.items()}
    assert status == {"env": "PASS", "compile": "SKIP", "tests": "SKIP", "kernels": "SKIP",
                      "dali": "PASS" if DALI else "SKIP", "decode": "PASS",
                      "distill": "SKIP", "train": "PASS", "step": "PASS"}
    assert "needs a CUDA GPU" in summary["tests"]["note"]
    assert all("--skip" in summary[s]["note"] for s in ("compile", "kernels", "distill"))
    assert all(r["seconds"].isdigit() for r in summary.values())

    assert "DRY RUN (--dry-run given)" in stdout
    assert "skipped: tests (needs a CUDA GPU" in stdout
    assert "skipped: kernels (skipped with --skip)" in stdout
    printed = stdout.rstrip().splitlines()
    table = len(STAGES) + 1
    assert printed[-1].startswith("step ") and printed[-table].startswith("stage ")  # last
    assert (out / "summary.txt").read_text().rstrip().splitlines()[-table:] == printed[-table:]
    for stage in STAGES:
        assert (out / f"{stage}.log").is_file()


@pytest.mark.slow
def test_step_smoke_writes_every_row(dry_run: tuple[Path, str]) -> None:
    out, _ = dry_run
    rows = {r["setting"]: r for r in _csv(out / "step_smoke.csv")}
    assert list(rows) == ["ours triton", "ours torch", "timm eager", "ours sdpa cudnn",
                          "ours sdpa flash", "ours sdpa efficient", "ours triton compiled",
                          "timm compiled", "ours triton attention", "ours triton layernorm",
                          "ours triton gelu"]  # in priority order
    for name, row in rows.items():
        assert row["model"] == "smoke: 1 block, 32 px" and row["batch"] == "2"
        if name == "ours triton compiled":  # compile cannot trace interpreted Triton ops
            assert row["status"].startswith("skipped:") and row["img_per_s"] == ""
            continue
        if name in ("ours sdpa cudnn", "ours sdpa efficient"):  # CUDA kernels: a CPU has none
            assert row["status"].startswith("error: RuntimeError") and row["img_per_s"] == ""
            assert row["sdpa_backend"] == name.split()[-1]
            continue
        assert row["status"] == "ok", (name, row["status"])
        assert float(row["img_per_s"]) > 0 and float(row["mfu"]) > 0
    assert rows["timm eager"]["speedup_vs_timm_eager"] == "1.0"
    assert rows["ours torch"]["sdpa_backend"] == "default"
    assert rows["ours sdpa flash"]["kernels"] == rows["ours torch"]["kernels"]
    # the img/s beside the committed traffic table's bounds: none on a CPU
    compared = (out / "step_vs_bound.txt").read_text().splitlines()
    assert compared[0].startswith("bounds: ") and len(compared) == 2 + len(rows)
    assert compared[2].split() == ["smoke:", "1", "block,", "32", "px", "ours", "triton",
                                   "2", rows["ours triton"]["img_per_s"]]
    meta = json.loads((out / "step_smoke.json").read_text())
    assert {"device", "torch", "triton", "timm", "date", "command", "peak_matmul_tflops",
            "train_flops_per_image"} <= meta.keys()
    # The docstring's count for the smoke model (C=192, one block, 32 px: P=4, N=5, H=768):
    patch = 2 * 4 * 3 * 16**2 * 192
    forward = patch + 2 * 5 * 192 * (4 * 192 + 2 * 768) + 4 * 5**2 * 192 + 2 * 192 * 1000
    assert meta["train_flops_per_image"] == {"smoke: 1 block, 32 px": 3 * forward - patch}
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


@pytest.mark.slow
@pytest.mark.skipif(not DALI, reason="DALI is not installed")
def test_dali_smoke_runs_the_loader_and_its_check(dry_run: tuple[Path, str]) -> None:
    out, _ = dry_run
    (row,) = _csv(out / "dali_smoke.csv")
    assert row["loader"] == "dali-cpu" and row["rand_augment"] == "rand-m9-mstd0.5-inc1"
    assert float(row["img_per_s"]) > 0 and row["check"] == "ok"
    # Both sides are the CPU graph here: the check must find them equal.
    assert float(row["max_abs_diff"]) == 0 and int(row["check_images"]) == 4
    meta = json.loads((out / "dali_smoke.json").read_text())
    assert meta["check"]["same_samples"] is True and meta["dali"]
    assert "img/s" in _summary(out)["dali"]["note"]


def test_dali_check_passes_rounding_and_flags_a_changed_image_or_sample() -> None:
    from benchmarks.dali_gpu import compare
    from deit_fast.data_pipeline import TrainBatch
    from tests.helpers import recipe_plan

    params = recipe_plan()
    std = torch.tensor(params.std).view(1, 3, 1, 1) * 255
    images = torch.randn(5, 3, 17, 19)
    ids = {k: torch.randint(0, 100, (5,)) for k in ("labels", "samples", "repeats", "views")}
    ref = TrainBatch(images=images, **ids)
    # Off by exactly one pixel level everywhere: MSE 1, PSNR 20 log10(255) = 48.13 dB.
    signs = torch.randint(0, 2, images.shape) * 2 - 1
    near = compare(ref, TrainBatch(images=images + signs / std, **ids), params, 30.0)
    assert near["ok"] and near["same_samples"] and near["images"] == 5
    assert near["psnr_min"] == pytest.approx(48.13, abs=0.01)
    assert near["max_abs_diff"] == pytest.approx(1.0, abs=1e-4)

    changed = images.clone()
    changed[3] = torch.randn(3, 17, 19)  # another image: ~4.4 std of noise on one of five
    far = compare(ref, TrainBatch(images=changed, **ids), params, 30.0)
    assert not far["ok"] and far["same_samples"] and far["psnr_min"] < 30
    assert far["psnr_median"] > 100  # the other four are equal

    other = dict(ids, samples=ids["samples"] + 1)
    assert not compare(ref, TrainBatch(images=images, **other), params, 30.0)["same_samples"]


def _stand_in_repo(tmp_path: Path, compile_rc: int) -> Path:
    """A repository holding gpu_check.sh, a compile check that exits compile_rc, a
    distillation benchmark that prints its table, and no benchmarks/dali_gpu.py."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "benchmarks").mkdir()
    shutil.copy(SCRIPT, repo / "scripts")
    (repo / "benchmarks" / "compile.py").write_text(
        f"import sys\nprint('7 compiles, 2 failing; written to x', file=sys.stderr)\n"
        f"sys.exit({compile_rc})\n")
    (repo / "benchmarks" / "distill.py").write_text(
        "print('none                          10.0     100.0       0.5')\n"
        "print('hard, cached teacher          20.0      50.0       1.0')\n"
        "print('hard, online teacher          40.0      25.0       2.0')\n")
    return repo


def _run_stand_in(repo: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh"), str(out),
                           "--dry-run", "--skip", "env,tests,kernels,decode,train,step"],
                          env=dict(os.environ, PYTHON=sys.executable), capture_output=True,
                          text=True, timeout=120)


def test_missing_scripts_are_skipped_and_a_failed_compile_is_flagged(tmp_path: Path) -> None:
    repo = _stand_in_repo(tmp_path, compile_rc=1)
    done = _run_stand_in(repo, tmp_path / "out")
    assert done.returncode == 1  # the compile stage failed
    summary = _summary(tmp_path / "out")
    assert summary["compile"]["status"] == "FAIL"
    assert "7 compiles, 2 failing" in summary["compile"]["note"]
    assert summary["dali"]["status"] == "SKIP"
    assert summary["dali"]["note"] == "skipped: benchmarks/dali_gpu.py missing"
    assert summary["distill"]["status"] == "PASS"  # ran all the same, and says after what
    assert summary["distill"]["note"].endswith(
        "ms/step: none 10.0, cached 20.0, online 40.0; cached/none 2.00x; "
        "after a failed compile check")
    assert "FLAG: compile check did not pass (7 compiles, 2 failing" in done.stdout

    (repo / "benchmarks" / "compile.py").unlink()
    done = _run_stand_in(repo, tmp_path / "out2")
    assert done.returncode == 0, done.stdout
    summary = _summary(tmp_path / "out2")
    assert summary["compile"]["note"] == "skipped: benchmarks/compile.py missing"
    assert "after a failed compile check" not in summary["distill"]["note"]
    assert "FLAG:" not in done.stdout


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    for args in ([], [str(tmp_path), "--skip", "nonsense"], [str(tmp_path), "--budget", "step"]):
        done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2 and done.stderr, args


# ---------------------------------------------------------------- DALI's parts

needs_zstd = pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd command")


@pytest.fixture
def parts(tmp_path: Path) -> Path:
    """A small site folder (a module and 40 kB of random bytes) packed in 16 kB parts."""
    site = tmp_path / "site"
    (site / "packed_module").mkdir(parents=True)
    (site / "packed_module" / "__init__.py").write_text("VALUE = 41 + 1\n")
    (site / "packed_module" / "blob.bin").write_bytes(os.urandom(40_000))
    out = tmp_path / "parts"
    done = subprocess.run(["bash", str(REPO / "scripts" / "pack_dali.sh"), str(out), "--site",
                           str(site)], env=dict(os.environ, PART_SIZE="16K", ZSTD_LEVEL="3"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return out


def _unpack(parts: Path, dest: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "unpack_dali.sh"), str(parts),
                           str(dest)], capture_output=True, text=True, timeout=60)


@needs_zstd
def test_parts_unpack_to_an_importable_folder(parts: Path, tmp_path: Path) -> None:
    names = sorted(p.name for p in parts.glob("*.part-*"))
    assert len(names) == 3 and all(n.startswith("dali-") for n in names)
    assert all((parts / n).stat().st_size <= 16 * 1024 for n in names)
    assert [line.split()[1] for line in (parts / "SHA256SUMS").read_text().splitlines()] == names

    dest = tmp_path / "dest"
    done = _unpack(parts, dest)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"export PYTHONPATH={dest}/site${{PYTHONPATH:+:$PYTHONPATH}}\n"
    assert (dest / "site" / "packed_module" / "blob.bin").read_bytes() == (
        tmp_path / "site" / "packed_module" / "blob.bin").read_bytes()
    imported = subprocess.run(["bash", "-c", f"unset PYTHONPATH; {done.stdout} "
                               f"{sys.executable} -c 'import packed_module as m; print(m.VALUE)'"],
                              capture_output=True, text=True, timeout=60)
    assert imported.stdout == "42\n", imported.stderr
    again = _unpack(parts, dest)
    assert again.returncode == 0 and "already holds these parts" in again.stderr


@needs_zstd
def test_a_corrupt_or_missing_part_is_named_and_nothing_is_unpacked(parts: Path,
                                                                    tmp_path: Path) -> None:
    names = sorted(p.name for p in parts.glob("*.part-*"))
    corrupt = parts / names[1]
    data = bytearray(corrupt.read_bytes())
    data[100] ^= 1
    corrupt.write_bytes(bytes(data))
    (parts / names[2]).unlink()
    done = _unpack(parts, tmp_path / "dest")
    assert done.returncode == 1 and done.stdout == ""
    assert f"bad part {names[1]}" in done.stderr and f"missing part {names[2]}" in done.stderr
    assert names[0] not in done.stderr
    assert not (tmp_path / "dest" / "site").exists()

    done = _unpack(tmp_path / "nowhere", tmp_path / "dest")
    assert done.returncode == 1 and "SHA256SUMS not found" in done.stderr
