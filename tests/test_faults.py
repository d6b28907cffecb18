"""A run survives SIGKILL, SIGTERM, Ctrl-C, NaN losses and failed writes, and resumes exactly.

Faults from inside the run (a signal at a chosen step, a kill inside a checkpoint write)
come from tests/fault_driver.py; signals from outside go to `python -m deit_fast train`,
the way a user, a terminal or a scheduler sends them.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deit_fast import checkpoint
from deit_fast.data_pipeline import files
from deit_fast.run import train
from deit_fast.train import BadStepsError
from tests.helpers import (
    FAULT_ARGS,
    ROOT,
    TensorLoader,
    assert_same_run,
    overrides,
    tensor_trainer,
    tiny_config,
    write_tiny_imagefolder,
)


def run_driver(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tests.fault_driver", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "data"
    write_tiny_imagefolder(root)
    return root


@pytest.fixture(scope="module")
def straight(data):
    out = data.parent / "straight"
    train(tiny_config(data, out, *FAULT_ARGS, "train.max_steps=5"))
    return out


# --------------------------------------------------------------------------- kill and stop
@pytest.mark.parametrize("during_write", [False, True], ids=["mid-epoch", "inside-write"])
def test_sigkill_then_rerun_ends_identical(data, straight, during_write):
    # 3 steps an epoch; writes: last.pt at step 2, last.pt and best.pt at step 3 (epoch end),
    # last.pt at step 4. Killed as the 5th step starts, last.pt is step 4's (mid-epoch);
    # killed inside the 4th write, between its temporary file and the rename, step 3's.
    out = data.parent / f"killed-{during_write}"
    args = ["--at", "4", *(["--during-write"] if during_write else [])]
    killed = run_driver(*args, "--", *overrides(data, out, "train.max_steps=5"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    last = checkpoint.load(out / "checkpoints" / "last.pt")
    assert last["global_step"] == (3 if during_write else 4)
    assert len(list((out / "checkpoints").glob(".*.tmp"))) == int(during_write)
    train(tiny_config(data, out, *FAULT_ARGS, "train.max_steps=5"))  # the same command again
    assert_same_run(straight, out)
    assert not list((out / "checkpoints").glob(".*.tmp"))  # the killed write's file is gone


def test_sigkill_under_accumulation_resumes_identical(data):
    """7 steps an epoch in updates of 2: in epoch 1 the update ends (9, 11, 13) fall between
    the multiples of train.checkpoint_interval=2, and the checkpoints wait for them. Killed
    as step 12 starts, the run holds step 11's checkpoint (not a half update's at 12) and
    resumes to the parameters of an uninterrupted run, bit for bit."""
    args = ("data.batch_size=4", "train.accum_steps=2", "train.max_steps=14")
    straight = data.parent / "accumulated"
    train(tiny_config(data, straight, *FAULT_ARGS, *args))
    out = data.parent / "accumulated-killed"
    killed = run_driver("--at", "12", "--", *overrides(data, out, *args))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert checkpoint.load(out / "checkpoints" / "last.pt")["global_step"] == 11
    train(tiny_config(data, out, *FAULT_ARGS, *args))
    assert checkpoint.load(out / "checkpoints" / "last.pt")["global_step"] == 14
    assert_same_run(straight, out)


def test_sigterm_checkpoints_exits_zero_and_resumes_identical(data, straight):
    out = data.parent / "terminated"
    stopped = run_driver("--send", "SIGTERM", "--at", "3", "--",
                         *overrides(data, out, "train.max_steps=5"))
    assert stopped.returncode == 0, stopped.stderr
    assert "received SIGTERM" in stopped.stderr
    assert "stopped on request at step 4" in stopped.stderr
    assert json.loads(stopped.stdout.splitlines()[-1])["stopped"] is True
    assert checkpoint.load(out / "checkpoints" / "last.pt")["global_step"] == 4
    train(tiny_config(data, out, *FAULT_ARGS, "train.max_steps=5"))
    assert_same_run(straight, out)


# --------------------------------------------------------------------------- NaN losses
def snapshot(trainer):
    return ({k: v.clone() for k, v in trainer.model.state_dict().items()},
            {k: v.clone() for k, v in trainer.step.ema.state_dict().items()},
            [{k: v.clone() for k, v in s.items()} for s in trainer.step.optimizer.state.values()])


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_nan_loss_step_changes_nothing_and_is_counted(tmp_path, fused):
    trainer = tensor_trainer(tmp_path, bad={1, 3})
    if fused:  # the CUDA path (found_inf inside the kernel), run here on the CPU
        trainer.step.optimizer = torch.optim.AdamW(trainer.model.parameters(), fused=True)
    batches = list(trainer.train_loader.epoch(0))
    trainer.train_step(batches[0])
    before = snapshot(trainer)
    _, bad = trainer.train_step(batches[1])
    assert bad.item() == 1.0
    for x, y in zip(before[:2], snapshot(trainer)[:2]):
        assert all(torch.equal(x[k], y[k]) for k in x)  # weights and EMA untouched
    for x, y in zip(before[2], snapshot(trainer)[2]):
        assert all(torch.equal(x[k], y[k]) for k in x)  # AdamW moments and step count too
    trainer = tensor_trainer(tmp_path / "fit", bad={1, 3})
    summary = trainer.fit()
    trainer.close()
    records = [json.loads(line) for line in open(tmp_path / "fit" / "metrics.jsonl")]
    assert [r["bad_steps"] for r in records if "loss" in r] == [0, 1, 1, 2, 2, 2]
    assert summary["bad_steps"] == 2 and summary["global_step"] == 6
    assert all(r["loss"] == r["loss"] for r in records if r["step"] in (1, 3, 5, 6))


def test_fp16_nan_loss_lowers_the_scale(tmp_path):
    trainer = tensor_trainer(tmp_path, bad={1}, precision="fp16")
    batches = list(trainer.train_loader.epoch(0))
    trainer.train_step(batches[0])
    scale = trainer.step.scaler.get_scale()
    trainer.train_step(batches[1])
    assert trainer.step.scaler.get_scale() == scale * 0.5


def test_nan_streak_stops_with_a_message(tmp_path):
    trainer = tensor_trainer(tmp_path, {2, 3, 4}, "train.max_bad_steps=3")
    with pytest.raises(BadStepsError, match=r"NaN or inf for 3 steps in a row "
                                            r"\(train.max_bad_steps=3\), last at step 5"):
        trainer.fit()
    trainer.close()


# --------------------------------------------------------------------------- failed writes
@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_failed_write_in_training_keeps_last_checkpoint_loadable(tmp_path, monkeypatch, fault):
    trainer = tensor_trainer(tmp_path, bad=())
    for batch in list(trainer.train_loader.epoch(0))[:2]:
        trainer.train_step(batch)
        trainer.global_step += 1
    trainer.save()
    trainer.train_step(next(iter(trainer.train_loader.epoch(0, 2))))
    trainer.global_step += 1
    if fault == "disk full":
        def fail(*args, **kwargs):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(files.os, "replace", fail)
        message = "No space left on device"
    else:
        def fail(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(files.tempfile, "mkstemp", fail)
        message = "Permission denied"
    with pytest.raises(OSError, match=f"could not write checkpoint .*last.pt.*{message}.*"
                                      "previous checkpoint is unchanged"):
        trainer.save()
    trainer.close()
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["global_step"] == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.pt"]


def test_position_of_another_world_size_is_a_global_item_count(tmp_path):
    saved = tensor_trainer(tmp_path / "saved", bad=())
    state = saved.state_dict()
    saved.close()
    # 3 steps of 2 ranks x batch 2 = 12 items; this run has one rank with batch 8
    state.update(item_in_epoch=12, step_in_epoch=3, global_step=3, world_size=2,
                 rng=[state["rng"][0]] * 2)
    trainer = tensor_trainer(tmp_path / "resumed", (), "data.batch_size=8")
    trainer.train_loader = TensorLoader(torch.zeros(48, 3, 32, 32), torch.zeros(48).long(), 8)
    trainer.load_state_dict(state)
    trainer.close()
    assert (trainer.item_in_epoch, trainer.step_in_epoch, trainer.global_step) == (12, 1, 1)



# --------------------------------------------------------------------------- signals from outside
SIGNAL_ARGS = ("data.batch_size=4", "data.num_workers=1", "train.epochs=2", "train.log_interval=1",
               "optim.warmup_epochs=0")


@pytest.fixture(scope="module", params=["torch", "dali"])
def straight_run(request, data):
    out = data.parent / f"straight-{request.param}"
    args = (*SIGNAL_ARGS, f"data.backend={request.param}")
    train(tiny_config(data, out, *args))
    return request.param, args, out


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [r["step"] for r in map(json.loads, filter(None, lines)) if "loss" in r]


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGTERM to the group"])
def test_signal_from_outside_checkpoints_exits_zero_and_resumes_identical(straight_run, how):
    """`python -m deit_fast train` signalled mid-epoch as a user (Ctrl-C, kill) or a scheduler
    (the whole process group: loader workers too) would; the same command then finishes the
    run exactly as an uninterrupted one, logging each step once."""
    backend, args, straight_dir = straight_run
    out = straight_dir.parent / f"{backend}-{how.replace(' ', '-')}"
    # the threads of this process, which trains the straight run and the resumed one: CPU
    # kernels of another thread count may round differently, and the check is bit for bit
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "deit_fast", "train",
                             *overrides(straight_dir.parent / "data", out, *args)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        while not logged_steps(out)[1:] and proc.poll() is None:  # step 2 is done
            time.sleep(0.02)
        sig = signal.SIGINT if how == "SIGINT" else signal.SIGTERM
        if how.endswith("group"):
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert stderr.count(f"received {sig.name}") == 1, stderr[-3000:]  # the trainer alone
    assert "stopped on request" in stderr and "run the same command to resume" in stderr
    summary = json.loads(stdout[stdout.index("{"):])
    total = checkpoint.load(straight_dir / "checkpoints" / "last.pt")["global_step"]
    assert summary["stopped"] is True and summary["global_step"] < total
    train(tiny_config(straight_dir.parent / "data", out, *args))  # the same command again
    assert_same_run(straight_dir, out)
    assert logged_steps(out) == logged_steps(straight_dir) == list(range(1, total + 1))


def test_group_sigterm_under_torchrun_stops_both_ranks_together(data):
    """A scheduler's SIGTERM to torchrun's process group reaches the agent, both ranks and
    their loader workers: the ranks finish the step on which they agree to stop, rank 0
    checkpoints and prints once, no rank fails (torchrun itself still reports the signal
    with its own exit status 1); the run then finishes on one process, each step logged once."""
    out = data.parent / "torchrun-group"
    args = (*SIGNAL_ARGS, "train.stop_check_interval=2", "data.mixup=0.0", "data.cutmix=0.0")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "-m", "deit_fast", "train",
                             *overrides(data, out, *args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        while not logged_steps(out) and proc.poll() is None:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert stderr.count("received SIGTERM") == 2, stderr[-3000:]  # two ranks, no worker
    assert stderr.count("stopped on request") == 1 and "ChildFailedError" not in stderr
    assert stdout.count('"stopped": true') == 1  # rank 0 alone prints the summary
    state = checkpoint.load(out / "checkpoints" / "last.pt")
    assert state["world_size"] == 2 and state["global_step"] % 2 == 0
    train(tiny_config(data, out, *args, "data.batch_size=8"))  # the same global batch
    total = checkpoint.load(out / "checkpoints" / "last.pt")["global_step"]
    assert total > state["global_step"] and logged_steps(out) == list(range(1, total + 1))
