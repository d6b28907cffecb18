"""The demo and its ablation, wired end to end on one epoch (the real runs take minutes)."""

import json

import pytest
import torch

from deit_fast.ablation import HEADS, ROWS, run_ablation
from deit_fast.config import load_config
from deit_fast.demo import DEMO_RECIPE, DISTILLED_ROW, demo_config, run_demo

STAGES = ("data", "student_train", "teacher_train", "teacher_cache", "distilled_train")
ONE_EPOCH = ("train.epochs=1", "data.batch_size=128", "train.progress=false")


@pytest.fixture
def one_thread():
    """Two intra-op threads on two busy cores spin-wait: the demo runs ~4x slower in CI."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_demo_recipe_is_configs_demo_yaml(tmp_path):
    cfg = demo_config(tmp_path, ["train.epochs=3"])
    recipe = load_config(DEMO_RECIPE, [f"data.path={tmp_path / 'digits'}",
                                       f"train.output_dir={tmp_path / 'run'}", "train.epochs=3"])
    assert cfg == recipe and cfg.model.name == "deit_micro_patch4_32"


def test_demo_writes_its_summary_and_distils_from_the_batches_cache(tmp_path, one_thread):
    summary = run_demo(tmp_path, ONE_EPOCH, teacher_overrides=["train.epochs=1"])
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == summary
    assert written["distilled_gap_points"] == pytest.approx(
        written["distilled_top1"] - written["student_top1"], abs=0.01)
    assert (written["train_images"], written["teacher_train_images"]) == (400, 899)
    for stage in STAGES:
        assert written[f"{stage}_seconds"] >= 0, stage
    assert written["total_seconds"] >= written["distilled_train_seconds"]
    # the committed ablation's interval for the demo's row rides along
    assert written["ablation"]["row"] == DISTILLED_ROW
    assert len(written["ablation"]["paired_ci95"]) == 2
    manifest = json.loads((tmp_path / "teacher_cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["cache_mode"] == "batches"
    assert manifest["topk"] == 10 and manifest["forwards"] == 3 * 128  # 1 epoch, 3 batches
    # the teacher trained through `deit-fast train` (model.name=test_resnet): its metrics
    teacher_log = [json.loads(line) for line in
                   (tmp_path / "teacher_run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in teacher_log if "top1" in r]
    assert evals[-1]["top1"] == pytest.approx(written["teacher_top1"])


def test_ablation_wiring_on_one_epoch_and_two_seeds(tmp_path, one_thread):
    summary = run_ablation(tmp_path, ONE_EPOCH, seeds=(0, 1), table=tmp_path / "table.md",
                           teacher_overrides=("train.epochs=1",))
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert json.loads((tmp_path / "table.json").read_text()) == summary
    assert summary["train_images"] == 400 and summary["seeds"] == [0, 1]
    assert [(r["row"], r["head"]) for r in summary["rows"]] == [
        (row.name, head) for row in ROWS for head in row.heads]
    plain = summary["rows"][0]
    for row in summary["rows"][1:]:  # paired with the plain student, seed by seed
        diffs = [a - b for a, b in zip(row["top1_per_seed"], plain["top1_per_seed"])]
        assert row["paired_mean"] == pytest.approx(sum(diffs) / 2, abs=0.011)
        low, high = row["paired_ci95"]
        assert low <= row["paired_mean"] <= high
    assert {r["head"] for r in summary["rows"]} == set(HEADS)
    table = (tmp_path / "table.md").read_text()
    assert all(row.name in table for row in ROWS)
    # a rerun reuses every finished run: nothing is trained again
    again = run_ablation(tmp_path, ONE_EPOCH, seeds=(0, 1), table=None)
    assert again["rows"] == summary["rows"] and again["seconds_this_call"] < 20
    assert again["run_seconds"] == summary["run_seconds"]  # what the runs took, kept
