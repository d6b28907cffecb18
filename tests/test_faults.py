"""A run survives SIGKILL, SIGTERM, NaN losses and failed checkpoint writes, and resumes exactly.

Run as a module (`python -m tests.test_faults`), this file is the driver that trains while
injecting a fault at a chosen step, the way tests/test_distributed.py also launches it.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline import Mixup
from deit_fast import checkpoint
from deit_fast.config import load_config, to_dict
from deit_fast.losses import DistillationLoss
from deit_fast.models import create_model
from deit_fast.run import train
from deit_fast.train import BadStepsError, Trainer
from tests.helpers import TensorLoader, tiny_config, write_tiny_imagefolder

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- the driver
def main(argv: list[str] | None = None) -> None:
    """Train with `overrides`; send signal `--send` to this process as step `at` starts (on `rank`),
    or inside the `at`-th checkpoint write, between the temporary file and its rename."""
    from deit_fast import train as train_module

    parser = argparse.ArgumentParser()
    parser.add_argument("--send", default="SIGKILL")
    parser.add_argument("--at", type=int, required=True)
    parser.add_argument("--during-write", action="store_true")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--eval-first", help="evaluate a seeded model on data.path/val first, "
                                             "writing the result here (JSON, from rank 0)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    sig = getattr(signal, args.send)
    cfg = load_config(None, args.overrides)
    if args.eval_first:
        from deit_fast import distributed

        dist = distributed.setup(torch.device("cpu"))  # train() joins this group
        result = seeded_eval(Path(cfg.data.path), dist.rank, dist.world_size)
        if dist.is_main:
            Path(args.eval_first).write_text(json.dumps(result))
    if int(os.environ.get("RANK", "0")) == args.rank:
        if args.during_write:
            replace, writes = os.replace, [0]

            def killing_replace(src, dst):
                writes[0] += 1
                if writes[0] == args.at:
                    os.kill(os.getpid(), sig)
                replace(src, dst)

            checkpoint.os.replace = killing_replace
        else:
            step = train_module.Trainer.train_step

            def signalling_step(self, batch):
                if self.global_step == args.at:
                    os.kill(os.getpid(), sig)
                return step(self, batch)

            train_module.Trainer.train_step = signalling_step
    print(json.dumps(train(cfg)))


def seeded_eval(data: Path, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """A fixed random micro DeiT evaluated on this rank's shard of data/val (batches of 4)."""
    from data_pipeline import DatasetIndex, build_val_loader
    from deit_fast.evaluate import evaluate

    torch.manual_seed(0)
    model = create_model("deit_micro_patch4_32", num_classes=3, depth=1)
    loader = build_val_loader(DatasetIndex.from_folder(data, split="val"), image_size=32,
                              batch_size=4, num_workers=0, rank=rank, world_size=world_size)
    return evaluate(model, loader, torch.device("cpu"))


def run_driver(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tests.test_faults", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------- helpers
def assert_same_run(a_dir: Path, b_dir: Path, atol: float = 0.0) -> None:
    """Same position and state; atol 0 means bit for bit."""
    a = checkpoint.load(a_dir / "checkpoints" / "last.pt")
    b = checkpoint.load(b_dir / "checkpoints" / "last.pt")
    assert (a["epoch"], a["global_step"], a["item_in_epoch"]) == \
        (b["epoch"], b["global_step"], b["item_in_epoch"])
    tol = {"rtol": 0, "atol": atol}
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], **tol, msg=key)
        torch.testing.assert_close(a["ema"][key], b["ema"][key], **tol, msg=f"ema {key}")
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(x["exp_avg_sq"], y["exp_avg_sq"], **tol)
        assert torch.equal(x["step"], y["step"])


FAULT_ARGS = ("train.checkpoint_interval=2", "train.log_interval=1", "train.epochs=2")


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


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    """tiny_config's settings as command-line overrides (JSON values read as YAML)."""
    cfg = to_dict(tiny_config(data, out, *FAULT_ARGS, *extra))
    return [f"{section}.{key}={json.dumps(value)}" for section, values in cfg.items()
            for key, value in values.items()]


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
class PoisonedLoss:
    """Cross-entropy, NaN on the calls listed in `bad` (0-based)."""

    def __init__(self, bad):
        self.bad, self.calls, self.loss = set(bad), 0, DistillationLoss()

    def __call__(self, *args):
        loss = self.loss(*args)
        self.calls += 1
        return loss * float("nan") if self.calls - 1 in self.bad else loss


def tensor_trainer(tmp_path, bad, *extra, precision="fp32"):
    torch.manual_seed(0)
    cfg = load_config(None, ["model.name=deit_micro_patch4_32", "train.epochs=1",
                             f"train.precision={precision}", "train.log_interval=1",
                             "train.progress=false", "data.batch_size=4", "train.ema_decay=0.5",
                             f"train.output_dir={tmp_path}", *extra])
    labels = torch.arange(24) % 3
    model = create_model(cfg.model.name, num_classes=3, depth=1)
    mix = Mixup(mixup_alpha=0.0, cutmix_alpha=0.0, num_classes=3)
    loader = TensorLoader(torch.randn(24, 3, 32, 32), labels, 4)
    return Trainer(cfg, model, loader, None, PoisonedLoss(bad), mix, torch.device("cpu"),
                   tmp_path)


def snapshot(trainer):
    return ({k: v.clone() for k, v in trainer.model.state_dict().items()},
            {k: v.clone() for k, v in trainer.ema.state_dict().items()},
            [{k: v.clone() for k, v in s.items()} for s in trainer.optimizer.state.values()])


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_nan_loss_step_changes_nothing_and_is_counted(tmp_path, fused):
    trainer = tensor_trainer(tmp_path, bad={1, 3})
    if fused:  # the CUDA path (found_inf inside the kernel), run here on the CPU
        trainer.optimizer = torch.optim.AdamW(trainer.model.parameters(), fused=True)
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
    scale = trainer.scaler.get_scale()
    trainer.train_step(batches[1])
    assert trainer.scaler.get_scale() == scale * 0.5


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
        monkeypatch.setattr(checkpoint.os, "replace", fail)
        message = "No space left on device"
    else:
        def fail(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(checkpoint.tempfile, "mkstemp", fail)
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


if __name__ == "__main__":
    main()
