import json

import pytest
import timm
import torch

from deit_fast.ablation import ROWS, run_ablation
from deit_fast.config import load_config
from deit_fast.demo import DEMO_RECIPE, TEACHER, demo_config, run_demo

STAGES = ("data", "student_train", "teacher_train", "teacher_cache", "distilled_train")


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


def test_demo_with_teacher_writes_its_summary(tmp_path, one_thread):
    summary = run_demo(tmp_path, ["train.epochs=1", "data.batch_size=128",
                                  "train.progress=false"], teacher_epochs=1)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == summary
    assert written["distilled_gap_points"] == pytest.approx(
        written["distilled_top1"] - written["student_top1"], abs=0.01)
    for stage in STAGES:
        assert written[f"{stage}_seconds"] >= 0, stage
    assert written["total_seconds"] >= written["distilled_train_seconds"]
    manifest = json.loads((tmp_path / "teacher_cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_views"] == 1 and manifest["topk"] == 10
    assert manifest["forwards"] == written["train_images"]  # 1 epoch: one view per image
    # the teacher trained through the Trainer: its metrics, and weights that load into it
    teacher_log = [json.loads(line) for line in
                   (tmp_path / "teacher_run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in teacher_log if "top1" in r]  # the last record is the last loss window
    assert evals[-1]["top1"] == pytest.approx(written["teacher_top1"])
    timm.create_model(TEACHER, num_classes=10).load_state_dict(
        torch.load(tmp_path / "teacher.pt", weights_only=True))


def test_ablation_wiring_on_one_seed_and_epoch(tmp_path, one_thread):
    summary = run_ablation(tmp_path, ["train.progress=false"], seeds=(0,), per_class=8,
                           epochs=1, teacher_epochs=1, table=tmp_path / "table.md")
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert json.loads((tmp_path / "table.json").read_text()) == summary
    assert summary["train_images"] == 80 and summary["seeds"] == [0]
    names = [r["row"] for r in summary["rows"]]
    assert names[:3] == [name for name, *_ in ROWS[:3]]
    assert names[3:] == [f"{ROWS[3][0]}, {head} head" for head in ("class", "distillation",
                                                                    "joint")]
    for row in summary["rows"]:
        assert len(row["top1_per_seed"]) == 1 and row["top1_std"] == 0.0
    # the joint head is the model's own evaluation output, as the Trainer measured it
    log = [json.loads(line) for line in
           (tmp_path / "row3_seed0" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in log if "top1" in r]
    assert summary["rows"][-1]["top1_mean"] == pytest.approx(evals[-1]["top1"], abs=0.01)
    table = (tmp_path / "table.md").read_text()
    assert all(name in table for name in names)
    assert "8 training images per digit (80 in all)" in table
