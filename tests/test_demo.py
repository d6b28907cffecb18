import json

import pytest
import torch

from deit_fast.demo import run_demo

STAGES = ("data", "student_train", "teacher_train", "teacher_cache", "distilled_train")


@pytest.fixture
def one_thread():
    """Two intra-op threads on two busy cores spin-wait: the demo runs ~4x slower in CI."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_demo_with_teacher_writes_its_summary(tmp_path, one_thread):
    summary = run_demo(tmp_path, ["train.epochs=1", "data.batch_size=128",
                                  "train.progress=false"], teacher_epochs=1)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == summary
    for key in ("student_top1", "teacher_top1", "distilled_top1"):
        assert 0 <= written[key] <= 100, key
    for stage in STAGES:
        assert written[f"{stage}_seconds"] >= 0, stage
    assert written["total_seconds"] >= written["distilled_train_seconds"]
    manifest = json.loads((tmp_path / "teacher_cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_views"] == 1 and manifest["topk"] == 1
