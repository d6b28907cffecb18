"""What a user sees when something goes wrong: each fault named in one line, nothing lost.

Ctrl-C twice, a full or read-only disk (a real small tmpfs where this runs as root), a
resume with another config, an unusable output folder, a checkpoint of another
architecture, eval against training's own evaluation, and the counting and logging of a run.
"""

import json
import os
import shutil
import signal
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from deit_fast import checkpoint
from deit_fast.cli import main
from deit_fast.data_pipeline.teacher_cache import _write
from deit_fast.distributed import StopRequest
from deit_fast.metrics import plot_curves, read_metrics
from deit_fast.models import CheckpointMismatch, create_model, load_checkpoint
from deit_fast.run import train, warn_view_reuse
from tests.helpers import overrides, tensor_trainer, tiny_config, write_tiny_imagefolder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports") / "data"
    write_tiny_imagefolder(root)
    return root


# --------------------------------------------------------------------------- Ctrl-C
def test_second_ctrl_c_stops_at_once(capsys):
    with StopRequest() as stop:
        stop._handle(signal.SIGINT, None)  # the first: a stop request, as SIGTERM
        assert stop and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)
    assert "press Ctrl-C again to stop at once" in capsys.readouterr().err


def test_cli_reports_an_interrupt_in_one_line(capsys, monkeypatch, tmp_path):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr("deit_fast.run.train", interrupted)
    assert main(["train", f"train.output_dir={tmp_path}"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "same command" in err


def test_only_rank_zero_prints_the_summary(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("deit_fast.run.train", lambda cfg: {"global_step": 7})
    monkeypatch.setenv("RANK", "1")
    assert main(["train", f"train.output_dir={tmp_path}"]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["train", f"train.output_dir={tmp_path}"]) == 0
    assert '"global_step": 7' in capsys.readouterr().out


# --------------------------------------------------------------------------- full disk
@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs: a real ENOSPC (and, remounted, EROFS)."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as f, pytest.raises(OSError):
        while True:
            f.write(bytes(16384))
            f.flush()


def test_full_disk_from_torch_save_is_reworded(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: torch.save's own report of a full disk, a RuntimeError
    raised while the OSError is handled, as a full file system makes it."""
    last = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": torch.tensor(1)}, last)

    def full(state, f):
        try:
            raise OSError(28, "No space left on device")
        except OSError:  # the OSError stays as the RuntimeError's context, as in torch
            raise RuntimeError(  # noqa: B904
                "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(OSError, match=r"could not write checkpoint '.*last\.pt' \(No space left "
                                      r"on device\); the previous checkpoint is unchanged"):
        checkpoint.save_atomic({"step": torch.tensor(2)}, last)
    assert checkpoint.load(last)["step"].item() == 1 and os.listdir(tmp_path) == ["last.pt"]


def test_full_disk_names_path_and_cause_and_keeps_previous_files(small_fs, data):
    last, png, shard = small_fs / "last.pt", small_fs / "curves.png", small_fs / "shard.bin"
    checkpoint.save_atomic({"step": torch.tensor(1)}, last)
    metrics = small_fs / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 1.0, "lr": 0.1}) + "\n")
    plot_curves(metrics, png)
    _write(shard, b"old")
    before = png.read_bytes()
    fill(small_fs)
    with pytest.raises(OSError, match=r"could not write checkpoint '.*last\.pt' \(No space left "
                                      r"on device\); the previous checkpoint is unchanged"):
        checkpoint.save_atomic({"weights": torch.randn(100_000)}, last)
    assert checkpoint.load(last)["step"].item() == 1
    with pytest.raises(OSError, match=r"could not write plot '.*curves\.png' \(No space left"):
        plot_curves(metrics, png)
    assert png.read_bytes() == before
    with pytest.raises(OSError, match=r"could not write cache file '.*shard\.bin' \(No space "):
        _write(shard, bytes(100_000))
    assert shard.read_bytes() == b"old"
    assert sorted(p.name for p in small_fs.iterdir()) == [
        "curves.png", "filler", "last.pt", "metrics.jsonl", "shard.bin"]  # no temporaries
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    with pytest.raises(OSError, match=r"could not write checkpoint .*\(Read-only file system\)"):
        checkpoint.save_atomic({"step": torch.tensor(2)}, last)


# --------------------------------------------------------------------------- config and folders
def test_resume_with_another_config_names_the_keys_and_keeps_config_yaml(data, tmp_path):
    out = tmp_path / "run"
    train_args = ("train.max_steps=2", "optim.warmup_epochs=0")
    train(tiny_config(data, out, *train_args))
    saved = (out / "config.yaml").read_bytes()
    with pytest.raises(ValueError, match=r"another config: model.img_size: None in the "
                                         r"checkpoint, 48 now; optim.lr: 0.0005 in the "
                                         r"checkpoint, 0.001 now\. Resume with"):
        train(tiny_config(data, out, *train_args, "model.img_size=48", "optim.lr=1e-3"))
    assert (out / "config.yaml").read_bytes() == saved


@pytest.mark.parametrize("problem", ["a file", "under a file"])
def test_output_dir_is_checked_before_any_work(tmp_path, capsys, problem):
    (tmp_path / "taken").write_text("")
    out = tmp_path / "taken" if problem == "a file" else tmp_path / "taken" / "run"
    # data.path does not exist: the output folder's error comes first
    assert main(["train", f"train.output_dir={out}", f"data.path={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert f"train.output_dir '{out}'" in err
    assert ("is a file" if problem == "a file" else "cannot be created") in err
    assert "data.path" not in err


def test_read_only_output_dir_is_named_before_any_work(small_fs, tmp_path, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    out = small_fs / "run"
    assert main(["train", f"train.output_dir={out}", f"data.path={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert f"train.output_dir '{out}' cannot be created or written to (Read-only file system)" \
        in err and "data.path" not in err


# --------------------------------------------------------------------------- architecture
def test_architecture_check_names_dist_token_before_any_resize():
    plain, distilled = (create_model(f"deit_micro{d}_patch4_32", num_classes=3, depth=1)
                        for d in ("", "_distilled"))
    with pytest.raises(CheckpointMismatch, match=r"unexpected tensor 'dist_token'"):
        load_checkpoint(plain, distilled.state_dict())
    with pytest.raises(CheckpointMismatch, match=r"tensor 'dist_token' \(1, 1, 96\) is missing"):
        load_checkpoint(distilled, plain.state_dict())


# --------------------------------------------------------------------------- eval
def test_eval_equals_trainings_evaluation_of_the_same_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "run"  # bf16 at 32 px: eval's defaults (fp32, deit_small at 224) differ
    train(tiny_config(data, out, "train.epochs=1", "train.precision=bf16",
                      "optim.warmup_epochs=0"))
    trained = [r for r in read_metrics(out / "metrics.jsonl") if "top1" in r][-1]
    last = str(out / "checkpoints" / "last.pt")
    for flag, key in (([], "top1"), (["--ema"], "ema_top1")):
        assert main(["eval", "--checkpoint", last, *flag, f"data.path={data}",
                     "data.num_workers=0"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["top1"] == trained[key], key
    assert main(["eval", "--checkpoint", last, f"data.path={data}", "data.num_workers=0",
                 "model.name=deit_micro_distilled_patch4_32"]) == 2  # an override wins
    assert "'dist_token'" in capsys.readouterr().err


# --------------------------------------------------------------------------- counting, logging
def test_bad_files_are_counted_once_over_train_val_and_a_resume(tmp_path):
    data = tmp_path / "data"
    write_tiny_imagefolder(data)
    (data / "train" / "class_0" / "bad.jpg").write_text("not an image")
    (data / "val" / "class_1" / "bad.jpg").write_text("not an image")
    # one step of all 31 images an epoch: the bad training file is met every epoch
    args = ("data.repeats=1", "data.batch_size=31", "train.epochs=4", "optim.warmup_epochs=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counted once, met three times before the resume
        first = train(tiny_config(data, tmp_path / "run", *args, "train.max_steps=3"))
        resumed = train(tiny_config(data, tmp_path / "run", *args))
    assert (first["bad_images"], resumed["bad_images"]) == (2, 2)
    saved = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["bad_files"]
    assert saved == [str(data / "train" / "class_0" / "bad.jpg"),
                     str(data / "val" / "class_1" / "bad.jpg")]


def test_the_last_partial_log_window_is_written(tmp_path):
    trainer = tensor_trainer(tmp_path, (), "train.log_interval=50")
    trainer.train_loader = type(trainer.train_loader)(torch.randn(60, 3, 32, 32),
                                                      torch.arange(60) % 3, 4)
    summary = trainer.fit()  # 15 steps
    trainer.close()
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert summary["global_step"] == 15 and [r["step"] for r in rows] == [15]
    assert rows[0]["loss"] == rows[0]["loss"] and (tmp_path / "curves.png").is_file()


def test_resume_drops_records_logged_after_the_checkpoint(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "run"
    args = ("train.log_interval=1", "optim.warmup_epochs=0")
    train(tiny_config(data, out, *args, "train.max_steps=4"))
    with open(out / "metrics.jsonl", "a") as f:  # a killed run logged steps 5, 6, then died
        f.writelines(json.dumps({"step": s, "loss": 9.0, "lr": 0.0}) + "\n" for s in (5, 6))
    with SummaryWriter(str(out / "tensorboard")) as writer:
        for s in (5, 6):
            writer.add_scalar("loss", 9.0, s)
    train(tiny_config(data, out, *args, "train.max_steps=6"))
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and 9.0 not in [r["loss"] for r in rows]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert sorted(e.step for e in scalars) == [1, 2, 3, 4, 5, 6]
    assert 9.0 not in [e.value for e in scalars]


def test_data_check_and_training_agree_on_an_empty_class_folder(tmp_path, capsys):
    data = tmp_path / "data"
    write_tiny_imagefolder(data)
    (data / "train" / "class_9").mkdir()
    (data / "val" / "class_9").mkdir()  # the same classes in both splits: one stop, not two
    shutil.copy(data / "val" / "class_0" / "0.jpg", data / "val" / "class_9")
    assert main(["data", "check", "--data-path", str(data)]) == 1
    captured = capsys.readouterr()
    assert f"{data / 'train' / 'class_9'}\tstops training: class folder has no images" in \
        captured.out and "training would stop on 1" in captured.err
    assert main(["train", *overrides(data, tmp_path / "run")]) == 2
    assert f"class folder has no images: {data / 'train' / 'class_9'}" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_bad_image_error_policy_is_one_line_naming_the_file(tmp_path, capfd, backend):
    data = tmp_path / "data"
    write_tiny_imagefolder(data)
    bad = data / "val" / "class_2" / "text.jpg"  # validation: every file is read, in order
    bad.write_text("not an image")
    code = main(["train", *overrides(data, tmp_path / "run", "data.on_bad_image=error",
                                     f"data.backend={backend}", "data.num_workers=1",
                                     "train.epochs=1", "optim.warmup_epochs=0")])
    err = capfd.readouterr().err
    assert code == 2
    (line,) = err.strip().splitlines()  # one line: no worker traceback
    reason = line.removeprefix(f"deit-fast train: error: cannot decode image {bad}: ")
    assert reason != line and "cannot identify image file" in reason


def test_warnings_for_reused_cache_views_and_a_warmup_longer_than_the_run(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "run", "distill.type=hard", "distill.source=cache",
                      f"distill.cache_dir={tmp_path}", "distill.cache_mode=views",
                      "distill.num_views=2", "train.epochs=3", "data.repeats=2")
    with pytest.warns(UserWarning, match=r"holds 2 views, this run shows 4 .*views repeat"):
        warn_view_reuse(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a full cache: one fresh view per showing, no warning
        warn_view_reuse(tiny_config(tmp_path, tmp_path / "run", "distill.type=hard",
                                    "distill.source=cache", f"distill.cache_dir={tmp_path}",
                                    "train.epochs=3", "data.repeats=2"))
    with pytest.warns(UserWarning, match=r"optim.warmup_epochs=5 is as long as the whole run"):
        tensor_trainer(tmp_path / "warm", (), "optim.warmup_epochs=5").close()

