"""The README's "Distilling on your own data", step by step through the command line on a
small tree: a timm teacher trained on the user's classes, its batches cache, a student
distilled from it, and each of the student's heads evaluated."""

import json
import subprocess

from tests.helpers import deit_fast, result, write_tiny_imagefolder


def succeeds(*args: str) -> subprocess.CompletedProcess:
    """deit_fast with `args`, which must exit 0."""
    run = deit_fast(*args)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_teacher_cache_student_and_heads(tmp_path):
    data = tmp_path / "mine"
    write_tiny_imagefolder(data)
    small = [f"data.path={data}", "data.batch_size=8", "data.num_workers=0", "train.epochs=2",
             "train.device=cpu", "train.precision=fp32", "train.progress=false",
             "model.img_size=32"]
    teacher = tmp_path / "teacher" / "checkpoints" / "best.pt"
    assert result(deit_fast("train", *small, "model.name=test_resnet", "model.drop_path=0.0",
                            f"train.output_dir={tmp_path / 'teacher'}"))["complete"]
    distill = ["model.name=deit_micro_distilled_patch4_32", "distill.type=hard",
               "distill.teacher=test_resnet", f"distill.teacher_checkpoint={teacher}",
               f"distill.cache_dir={tmp_path / 'teacher_cache'}", "distill.topk=3"]
    assert "teacher cache complete" in succeeds("cache-teacher", *small, *distill).stdout
    succeeds("train", *small, *distill, "distill.source=cache",
             f"train.output_dir={tmp_path / 'student'}")
    student = tmp_path / "student" / "checkpoints" / "best.pt"
    heads = {head: json.loads(succeeds("eval", "--checkpoint", str(student), f"data.path={data}",
                                       "--head", head).stdout) for head in
             ("class", "distillation", "joint")}
    assert all(0 <= h["top1"] <= 100 for h in heads.values())
    assert heads["class"]["val_loss"] != heads["distillation"]["val_loss"]
