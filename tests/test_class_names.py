"""Checkpoints carry their class names, and every reader compares them with the dataset's
by name, through the command line: eval (renamed, missing classes), resume, fine-tuning and
the teacher cache; eval's --config and --head, and the hint for a state dict without
model.name."""

import shutil

import pytest
import torch

from deit_fast import checkpoint
from deit_fast.data_pipeline import DatasetIndex, build_val_loader
from deit_fast.models import create_model
from tests.helpers import ROOT, deit_fast, overrides, result, val_loading, write_tiny_imagefolder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A micro DeiT trained 4 epochs on 3 colour-coded classes, and its data."""
    root = tmp_path_factory.mktemp("classes")
    write_tiny_imagefolder(root / "data")
    run = deit_fast("train", *overrides(root / "data", root / "run", "train.epochs=4",
                                        "data.mixup=0.0", "data.cutmix=0.0"))
    assert run.returncode == 0, run.stderr[-3000:]
    return root, root / "run" / "checkpoints" / "last.pt"


def copy_val(root, name, rename=None, drop=None):
    """data/ with val/ changed: a class folder renamed (old, new) or dropped."""
    data = root / name
    shutil.copytree(root / "data", data)
    if rename:
        (data / "val" / rename[0]).rename(data / "val" / rename[1])
    if drop:
        shutil.rmtree(data / "val" / drop)
    return data


def test_eval_refuses_a_renamed_class_and_scores_a_missing_one_by_name(trained):
    root, ckpt = trained
    assert checkpoint.load(ckpt)["classes"] == ["class_0", "class_1", "class_2"]
    renamed = deit_fast("eval", "--checkpoint", str(ckpt),
                        f"data.path={copy_val(root, 'renamed', rename=('class_0', 'zclass'))}")
    assert renamed.returncode == 2
    assert "val/ has classes the checkpoint's model was not trained on" in renamed.stderr
    assert "'zclass'" in renamed.stderr and "'class_0'" in renamed.stderr
    partial = copy_val(root, "partial", drop="class_0")  # val/'s labels would shift by one
    run = deit_fast("eval", "--checkpoint", str(ckpt), f"data.path={partial}")
    assert "val/ has 2 of the checkpoint's 3 classes" in run.stderr
    # the same images scored by hand against the checkpoint's labels of their class names
    model = create_model("deit_micro_patch4_32", num_classes=3)
    model.load_state_dict(checkpoint.load(ckpt)["model"])
    model.eval()
    index = DatasetIndex.from_folder(str(partial), split="val")
    images, labels = next(iter(build_val_loader(index, **val_loading(
        image_size=32, batch_size=64, num_workers=0))))
    with torch.no_grad():
        hits = (model(images).argmax(1) == labels + 1).float().mean().item()
    assert result(run)["top1"] == pytest.approx(100 * hits)


def test_a_checkpoint_without_names_needs_as_many_classes_as_its_head(trained):
    root, ckpt = trained
    raw = root / "raw.pt"
    torch.save(checkpoint.load(ckpt)["model"], raw)  # a bare state dict: no names
    run = deit_fast("eval", "--checkpoint", str(raw), "model.name=deit_micro_patch4_32",
                    f"data.path={copy_val(root, 'two', drop='class_2')}")
    assert run.returncode == 2
    assert "val/ has 2 class folders, the checkpoint's head 3 classes" in run.stderr


def test_resume_fine_tuning_and_the_cache_name_other_classes(trained, tmp_path):
    root, ckpt = trained
    other = tmp_path / "other"
    shutil.copytree(root / "data", other)
    for split in ("train", "val"):
        (other / split / "class_2").rename(other / split / "class_z")
    shutil.copytree(root / "run", tmp_path / "run")
    resumed = deit_fast("train", *overrides(other, tmp_path / "run", "train.epochs=4",
                                            "data.mixup=0.0", "data.cutmix=0.0"))
    assert resumed.returncode == 2
    assert "was written for other classes than this run's train/ folders" in resumed.stderr
    assert "'class_z'" in resumed.stderr
    tuned = deit_fast("train", *overrides(other, tmp_path / "tuned", "train.epochs=1",
                                          f"model.init_checkpoint={ckpt}"))
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert ("deit-fast: warning: model.init_checkpoint: the class head (head.weight, "
            "head.bias) starts from a fresh initialisation: the checkpoint's has other "
            "classes") in tuned.stderr
    same = deit_fast("train", *overrides(root / "data", tmp_path / "same", "train.epochs=1",
                                         f"model.init_checkpoint={ckpt}"))
    assert same.returncode == 0 and "class head" not in same.stderr


def test_eval_config_names_and_files_alike_and_the_distillation_heads(trained, tmp_path):
    root, ckpt = trained
    data = f"data.path={root / 'data'}"
    by_name = result(deit_fast("eval", "--config", "deit_small", "--checkpoint", str(ckpt),
                               data, "data.num_workers=0"))
    by_file = result(deit_fast("eval", "--config", str(ROOT / "configs" / "deit_small.yaml"),
                               "--checkpoint", str(ckpt), data, "data.num_workers=0"))
    plain = result(deit_fast("eval", "--checkpoint", str(ckpt), data))
    assert by_name == by_file == plain  # the checkpoint's own model, whichever --config
    moved = tmp_path / "fine_tune.yaml"  # a training config's start weights, since moved
    moved.write_text(f"model:\n  init_checkpoint: {tmp_path / 'moved.pt'}\n")
    run = deit_fast("eval", "--config", str(moved), "--checkpoint", str(ckpt), data)
    assert result(run) == plain and "init_checkpoint" not in run.stderr
    tiny = tmp_path / "deit_tiny.pth"
    torch.save(create_model("deit_tiny_patch16_224", num_classes=3).state_dict(), tiny)
    hint = deit_fast("eval", "--checkpoint", str(tiny), data)
    assert hint.returncode == 2 and "fits model.name=deit_tiny_patch16_224" in hint.stderr
    one_head = deit_fast("eval", "--checkpoint", str(ckpt), "--head", "class", data)
    assert one_head.returncode == 2 and "has one head" in one_head.stderr
    distilled = tmp_path / "distilled.pt"
    torch.manual_seed(0)
    torch.save(create_model("deit_micro_distilled_patch4_32", num_classes=3).state_dict(),
               distilled)
    heads = {head: result(deit_fast("eval", "--checkpoint", str(distilled), "--head", head,
                                    "model.name=deit_micro_distilled_patch4_32", data))
             for head in ("class", "distillation")}
    assert heads["class"]["val_loss"] != heads["distillation"]["val_loss"]
