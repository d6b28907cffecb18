"""`deit-fast data check` on the command line: it finds what training finds, and words what
stops training as `deit-fast train` does."""

import shutil
import subprocess

from tests.helpers import deit_fast, write_tiny_imagefolder

VAL_STOPS = "stops training unless train.eval_interval=0: "  # a run evaluates on val/


def _check(data) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """The run and its problems, {path: reason}."""
    run = deit_fast("data", "check", "--data-path", str(data))
    return run, dict(line.split("\t") for line in run.stdout.splitlines())


def _train(data, out, *extra: str) -> subprocess.CompletedProcess:
    """A tiny training run on data."""
    return deit_fast("train", "model.name=deit_micro_patch4_32", f"data.path={data}",
                     "train.epochs=1", "data.num_workers=0", "data.batch_size=4",
                     "train.device=cpu", "train.precision=fp32", "train.progress=false",
                     f"train.output_dir={out}", *extra)


def _train_error(data, out) -> str:
    """The error line of a tiny training run on data, which must stop before training."""
    run = _train(data, out)
    assert run.returncode == 2, run.stderr
    return run.stderr.strip().splitlines()[-1]


def test_nested_images_are_checked_and_counted(tmp_path):
    data = tmp_path / "data"
    write_tiny_imagefolder(data, per_class=6)
    folder = data / "train" / "class_0"
    (folder / "sub" / "deeper").mkdir(parents=True)
    shutil.move(folder / "0.jpg", folder / "sub" / "0.jpg")
    shutil.move(folder / "1.jpg", folder / "sub" / "deeper" / "1.jpg")
    (folder / "sub" / "deeper" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "sub" / "notes.txt").write_text("not an image")
    run, problems = _check(data)
    assert run.returncode == 1
    assert set(problems) == {str(folder / "sub" / "deeper" / "broken.jpg"),
                             str(folder / "sub" / "notes.txt")}
    assert problems[str(folder / "sub" / "notes.txt")] == "not an image file (extension)"
    assert f"{data / 'train'}: 3 classes, 19 images\n  class_0: 7 images\n" in run.stderr
    assert f"{data / 'val'}: 3 classes, 12 images\n" in run.stderr
    assert f"2 problem(s) found under {data}: training would stop on 0 and skip 2" in run.stderr


def test_a_missing_val_folder_stops_training(tmp_path):
    data = tmp_path / "data"
    write_tiny_imagefolder(data)
    shutil.rmtree(data / "val")
    run, problems = _check(data)
    assert run.returncode == 1
    reason = problems[str(data / "val")]
    assert reason == f"{VAL_STOPS}dataset split folder not found: {data / 'val'} (expected " \
        f"{data / 'val'}/<class>/<image>)"
    assert "training would stop on 1 and skip 0" in run.stderr
    assert reason.removeprefix(VAL_STOPS) in _train_error(data, tmp_path / "run")


def test_classes_that_differ_are_worded_as_training_words_them(tmp_path):
    data = tmp_path / "data"
    write_tiny_imagefolder(data)
    (data / "val" / "class_2").rename(data / "val" / "class_9")
    run, problems = _check(data)
    assert run.returncode == 1 and "training would stop on 1 and skip 0" in run.stderr
    assert problems[str(data / "val")].startswith(VAL_STOPS)
    reason = problems[str(data / "val")].removeprefix(VAL_STOPS)
    assert "in train/, missing from val/: 'class_2'; extra in val/, not in train/: " \
        "'class_9'" in reason
    assert _train_error(data, tmp_path / "run") == f"deit-fast train: error: {reason}"


def test_an_empty_class_folder_is_a_sentence_naming_it(tmp_path):
    data = tmp_path / "data"
    write_tiny_imagefolder(data)
    (data / "train" / "class_3" / "sub").mkdir(parents=True)
    (data / "val" / "class_3").mkdir()
    shutil.copy(data / "val" / "class_0" / "0.jpg", data / "val" / "class_3")
    run, problems = _check(data)
    assert run.returncode == 1 and "training would stop on 1 and skip 0" in run.stderr
    reason = problems[str(data / "train" / "class_3")].removeprefix("stops training: ")
    assert reason.startswith(f"class folder has no images: {data / 'train' / 'class_3'} (")
    assert ".jpg, .jpeg, .png" in reason and "('" not in reason
    assert _train_error(data, tmp_path / "run") == f"deit-fast train: error: {reason}"


def test_a_val_problem_stops_only_a_run_that_evaluates(tmp_path):
    data = tmp_path / "data"
    write_tiny_imagefolder(data)
    folder = data / "val" / "class_1"
    shutil.rmtree(folder)
    (folder / "sub").mkdir(parents=True)
    run, problems = _check(data)
    assert run.returncode == 1 and "training would stop on 1 and skip 0" in run.stderr
    reason = problems[str(folder)]
    assert reason.startswith(f"{VAL_STOPS}class folder has no images: {folder} (")
    assert _train_error(data, tmp_path / "run") == \
        f"deit-fast train: error: {reason.removeprefix(VAL_STOPS)}"
    never_evaluates = _train(data, tmp_path / "run0", "train.eval_interval=0")
    assert never_evaluates.returncode == 0, never_evaluates.stderr
