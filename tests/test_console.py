"""What a user sees on the command line: a line per evaluation, warnings on their own lines,
epochs numbered alike everywhere, a finished run that says so, an interrupted cache pass
that says how to go on, and a run without a validation split."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch

from tests.helpers import (
    ROOT,
    TEACHER,
    command_env,
    deit_fast,
    overrides,
    result,
    torchrun,
    write_tiny_imagefolder,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("console") / "data"
    write_tiny_imagefolder(root)
    return root


def run_args(data, out, *extra):
    """A 2-epoch tiny run (3 steps an epoch), logging every 50 steps: one partial window."""
    return ["train", *overrides(data, out, "train.epochs=2", "train.log_interval=50",
                                "train.checkpoint_interval=0", *extra)]


WARMUP = "optim.warmup_epochs=5"  # as long as the whole run: a warning


@pytest.fixture(scope="module")
def finished(data):
    """The 2-epoch run with WARMUP, trained once: its output folder and its command."""
    out = data.parent / "finished"
    run = deit_fast(*run_args(data, out, WARMUP))
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run


@pytest.fixture(scope="module")
def teacher(data):
    """A random timm teacher of the data's 3 classes, on disk."""
    path = data.parent / "teacher.pt"
    torch.save(timm.create_model(TEACHER, num_classes=3).state_dict(), path)
    return path


def test_a_run_tells_its_story_and_numbers_epochs_from_one(finished):
    out, run = finished
    lines = run.stderr.splitlines()
    evals = [line for line in lines if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in evals] == ["epoch 1/2", "epoch 2/2"]
    assert all("val top-1" in line and "(EMA" in line and "best" in line for line in evals)
    # a warning on its own line, once, without the source line Python would print
    warned = [line for line in lines if "warmup_epochs=5 is as long as the whole run" in line]
    assert len(warned) == 1 and warned[0].startswith("deit-fast: warning: ")
    assert "warnings.warn" not in run.stderr and "UserWarning" not in run.stderr
    summary = result(run)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["epoch"] for r in records if "loss" in r} == {2}  # the partial window: epoch 2
    assert summary["epoch"] == [r["epoch"] for r in records if "top1" in r][-1] == 2
    assert summary["complete"] is True


def test_a_finished_run_says_so_and_how_to_train_it_further(data, finished):
    out, _ = finished
    again = deit_fast(*run_args(data, out, WARMUP))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"the run in {out} is complete (2 of 2 epochs, step 6)" in again.stderr
    assert "model.init_checkpoint=" in again.stderr and "resuming" not in again.stderr
    assert result(again)["top1"] >= 0  # its last eval
    longer = deit_fast(*run_args(data, out, WARMUP, "train.epochs=3"))
    assert longer.returncode == 2
    assert "train.epochs: 2 in the checkpoint, 3 now" in longer.stderr
    assert f"model.init_checkpoint={out / 'checkpoints' / 'last.pt'}" in longer.stderr


def test_a_run_without_a_validation_split(data):
    no_val = data.parent / "no_val"
    shutil.copytree(data / "train", no_val / "train")
    run = deit_fast(*run_args(no_val, data.parent / "no_val_run", "train.eval_interval=0"))
    summary = result(run)
    assert summary["epoch"] == 2 and "top1" not in summary
    refused = deit_fast(*run_args(no_val, data.parent / "no_val_refused"))
    assert refused.returncode == 2
    assert f"dataset split folder not found: {no_val / 'val'}" in refused.stderr


def test_an_interrupted_cache_pass_says_how_to_go_on(data, teacher, tmp_path):
    """Ctrl-C during `cache-teacher`: exit 130, and the line says the shards written are kept
    and the same command finishes the cache."""
    # started as from a terminal, with Ctrl-C at its default, even where the tests run with
    # SIGINT ignored (a background job, nohup), which the command would inherit
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([
            sys.executable, "-m", "deit_fast", "cache-teacher", f"data.path={data}",
            "model.name=deit_micro_distilled_patch4_32", "data.num_workers=0",
            "data.batch_size=2", "train.epochs=200", "distill.shard_size=6", "distill.topk=3",
            f"distill.teacher={TEACHER}", f"distill.teacher_checkpoint={teacher}",
            f"distill.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, env=command_env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        while not list((tmp_path / "cache").glob("*.bin")) and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert ("deit-fast cache-teacher: interrupted; the shards already written are kept: run "
            "the same command again to finish the cache") in stderr


def test_under_torchrun_rank_0_alone_speaks(data, tmp_path):
    run = torchrun(*run_args(data, tmp_path / "ranks", WARMUP, "data.batch_size=4"),
                   module="deit_fast")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("is as long as the whole run") == 1
    assert run.stderr.count("epoch 2/2: val top-1") == 1 and run.stdout.count('"complete"') == 1


def test_shipped_recipes_pick_the_loader_for_the_machine_and_name_choices(data, teacher,
                                                                          tmp_path):
    """On a CPU the recipes (data.backend: auto) render with the torch loader, not DALI's
    slower CPU graph; a bool for a key of choices is refused listing them."""
    run = deit_fast("cache-teacher", "--config", "deit_tiny_distilled", f"data.path={data}",
                    "model.name=deit_micro_distilled_patch4_32", "data.batch_size=4",
                    "train.epochs=1", "train.progress=false", "distill.topk=3",
                    f"distill.teacher={TEACHER}", f"distill.teacher_checkpoint={teacher}",
                    f"distill.cache_dir={tmp_path / 'cache'}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "views by torch" in run.stdout
    refused = deit_fast("train", "train.compile=true")
    assert refused.returncode == 2
    assert "train.compile: expected str, got bool True; accepted: none, default, " \
           "max-autotune" in refused.stderr
