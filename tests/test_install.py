"""The wheel installs beside PyPI's top-level `kernels` package, ships its recipes, and says
where the benchmarks and results it does not ship are."""

import json
import os
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import ROOT, write_tiny_imagefolder

pytestmark = pytest.mark.slow


def pip(*args: str, cwd=None) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True, cwd=cwd,
                   env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder with a stand-in top-level `kernels` package, then our wheel installed into it."""
    tmp = tmp_path_factory.mktemp("install")
    standin = tmp / "site" / "kernels"
    standin.mkdir(parents=True)
    (standin / "__init__.py").write_text('WHO = "the other kernels package"\n')
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "wheel"), str(ROOT),
        cwd=tmp)
    (wheel,) = (tmp / "wheel").glob("deit_fast-*.whl")
    pip("install", "--no-deps", "--upgrade", "--target", str(tmp / "target"), str(wheel))
    for item in (tmp / "target").iterdir():  # beside the stand-in, which must stay as it was
        assert not (tmp / "site" / item.name).exists(), item.name
        item.rename(tmp / "site" / item.name)
    return tmp / "site", wheel


def run_installed(site, cwd, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_wheel_has_no_top_level_kernels_or_data_pipeline(site):
    _, wheel = site
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"deit_fast"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "deit_fast/kernels/attention.py" in names
    assert "deit_fast/data_pipeline/loader.py" in names
    assert "deit_fast/configs/deit_small.yaml" in names


def test_installed_package_imports_its_own_names_beside_pypi_kernels(site, tmp_path):
    code = ("import json, kernels, deit_fast, deit_fast.kernels as k, deit_fast.data_pipeline as d;"
            "from deit_fast.config import load_config;"
            "print(json.dumps([kernels.WHO, deit_fast.__file__, k.__file__, d.__file__,"
            " load_config('deit_small').model.name]))")
    done = run_installed(site[0], tmp_path, "-c", code)
    assert done.returncode == 0, done.stderr
    who, *files, model = json.loads(done.stdout)
    assert who == "the other kernels package"
    assert all(f.startswith(str(site[0])) for f in files), files
    assert model == "deit_small_patch16_224"


def test_installed_cli_trains_with_a_shipped_recipe_name(site, tmp_path):
    write_tiny_imagefolder(tmp_path / "data", classes=2, per_class=4, size=36)
    done = run_installed(site[0], tmp_path, "-m", "deit_fast", "train", "--config", "demo",
                         f"data.path={tmp_path / 'data'}", "data.batch_size=4",
                         "data.num_workers=0", "train.epochs=1", "train.progress=false",
                         "train.output_dir=run")
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert any("top1" in r for r in records) and records[-1]["step"] == 2  # 8 images / 4
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_installed_cli_says_where_the_benchmarks_are(site, tmp_path):
    done = run_installed(site[0], tmp_path, "-m", "deit_fast", "bench", "step", "--smoke")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "deit-fast bench step: the benchmarks ship with deit-fast's source checkout, not with "
        "this installed package; in a checkout, run `python benchmarks/step.py` (or "
        "`deit-fast bench step` after `pip install -e .` there)")
    assert not (tmp_path / "runs").exists()


def test_installed_demo_says_plainly_that_the_ablation_is_not_at_hand(site, tmp_path):
    code = ("from deit_fast.demo import ablation_interval, describe;"
            "assert ablation_interval() is None;"
            "print(describe({'val_images': 359, 'student_top1': 90.0, 'teacher': 'test_resnet',"
            " 'teacher_top1': 99.0, 'distilled_top1': 89.0, 'distilled_gap_points': -1.0,"
            " 'ablation': None}))")
    done = run_installed(site[0], tmp_path, "-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith(
        "No ablation interval for this row: it is read from "
        "benchmarks/results/distill_ablation.json of a source checkout (an installed package "
        "has none)")
