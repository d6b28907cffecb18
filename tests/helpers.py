"""What several test modules build: tiny image folders and configs, in-memory loaders, the
DeiT recipe's plan, run comparisons, and the launchers of the command line and of the fault
driver under torchrun."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import timm
import torch
from PIL import Image

from deit_fast import checkpoint, resolve
from deit_fast.config import Config, load_config, to_dict
from deit_fast.data_pipeline import Mixup, PlanParams
from deit_fast.losses import DistillationLoss
from deit_fast.models import create_model
from deit_fast.resolve import build_mixup, plan_params
from deit_fast.train import Trainer

ROOT = Path(__file__).resolve().parent.parent
FAULT_DRIVER = "tests.fault_driver"  # module that trains while injecting a fault at a step
TEACHER = "test_efficientnet"  # timm's ~100k-parameter test convnet: cheap on the CPU

# settings of the fault runs: checkpoints inside an epoch and a log line every step
FAULT_ARGS = ("train.checkpoint_interval=2", "train.log_interval=1", "train.epochs=2")
# deterministic data: no mixup (keyed per rank batch) and no drop path (per-rank RNG)
EXACT_DATA = ("data.mixup=0.0", "data.cutmix=0.0", "model.drop_path=0.0", "train.epochs=2",
              "optim.lr=0.05", "optim.warmup_epochs=0")  # a large lr: a wrong scaling shows


def recipe_mixup(num_classes: int, seed: int = 0, **changes) -> Mixup:
    """The default config's Mixup (the DeiT recipe), with data-config `changes` applied
    (mixup=, cutmix=, mixup_prob=, mixup_switch_prob=, label_smoothing=)."""
    return build_mixup(dataclasses.replace(Config().data, **changes), num_classes, seed)


def train_loading(**changes) -> dict:
    """build_train_loader's arguments but the index and plan: the default config's (seed,
    repeats, backend, bad-image policy), on the CPU with no worker process, and `changes`."""
    run = resolve.train_loading(Config(), torch.device("cpu"))
    del run["params"]
    return {**run, "num_workers": 0, **changes}


def val_loading(**changes) -> dict:
    """build_val_loader's arguments but the index, as train_loading."""
    return {**resolve.val_loading(Config(), torch.device("cpu")), "num_workers": 0, **changes}


def recipe_plan(**changes) -> PlanParams:
    """The plan of the default config (the DeiT recipe at 224 px), with `changes` applied."""
    return dataclasses.replace(plan_params(Config()), **changes)


def write_tiny_imagefolder(root: Path, classes: int = 3, per_class: int = 10, size: int = 40):
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 4)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                pixels[..., c] = 255  # a learnable colour cue per class
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)


def tiny_config(data: Path, out: Path, *extra: str):
    return load_config(None, [
        "model.name=deit_micro_patch4_32", "model.drop_path=0.1", f"data.path={data}",
        "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=0", "data.repeats=2",
        "data.rand_augment=rand-m9-mstd0.5-inc1", "data.mixup=0.8", "data.cutmix=1.0",
        "train.epochs=3", "train.precision=fp32", "train.device=cpu", "train.ema_decay=0.9",
        "train.log_interval=2", "train.progress=false", f"train.output_dir={out}", *extra])


class TensorLoader:
    """The loader seam with in-memory data: fixed batches, the same each epoch."""

    def __init__(self, images, labels, batch_size):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.steps_per_epoch, self.items_per_step = len(images) // batch_size, batch_size
        self.bad_files: set[str] = set()

    def epoch(self, epoch, start_step=0, start_item=None):
        for step in range(start_step, self.steps_per_epoch):
            part = slice(step * self.batch_size, (step + 1) * self.batch_size)
            yield SimpleNamespace(images=self.images[part], labels=self.labels[part])


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    """tiny_config's settings (with FAULT_ARGS) as command-line overrides (JSON read as YAML)."""
    cfg = to_dict(tiny_config(data, out, *FAULT_ARGS, *extra))
    return [f"{section}.{key}={json.dumps(value)}" for section, values in cfg.items()
            for key, value in values.items()]


def seeded_eval(data: Path, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """A fixed random micro DeiT evaluated on this rank's shard of data/val (batches of 4)."""
    from deit_fast.data_pipeline import DatasetIndex, build_val_loader
    from deit_fast.evaluate import evaluate

    torch.manual_seed(0)
    model = create_model("deit_micro_patch4_32", num_classes=3, depth=1)
    loader = build_val_loader(DatasetIndex.from_folder(data, split="val"), **val_loading(
        image_size=32, batch_size=4, num_workers=0, rank=rank, world_size=world_size))
    return evaluate(model, loader, torch.device("cpu"))


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


def command_env() -> dict[str, str]:
    """The environment of a command run from the repository: its code, one thread."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=command_env(), capture_output=True, text=True,
                          timeout=300)


def deit_fast(*args: str) -> subprocess.CompletedProcess:
    """The command line, `python -m deit_fast` with `args`."""
    return _run([sys.executable, "-m", "deit_fast", *args])


def result(run: subprocess.CompletedProcess) -> dict:
    """The JSON summary a successful command prints last."""
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout[run.stdout.index("{"):])


def torchrun(*args: str, module: str = FAULT_DRIVER) -> subprocess.CompletedProcess:
    """`module` (the fault driver) with `args` on two gloo ranks (torchrun --standalone)."""
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node=2", "-m", module, *args])


def teacher_setup(tmp_path: Path, *extra: str):
    """A tiny image folder, a random timm teacher on disk, and a config caching it (a views
    cache of 3 views, top-2)."""
    data = tmp_path / "data"
    if not data.exists():
        write_tiny_imagefolder(data, classes=3, per_class=5, size=36)
    teacher = tmp_path / "teacher.pt"
    if not teacher.exists():
        torch.manual_seed(0)
        torch.save(timm.create_model(TEACHER, num_classes=3).state_dict(), teacher)
    return load_config(None, [
        "model.name=deit_micro_distilled_patch4_32", f"data.path={data}", "data.num_workers=0",
        "data.repeats=2", "data.rand_augment=rand-m9-mstd0.5-inc1", "data.reprob=0.25",
        "data.eval_batch_size=4", "train.epochs=1", "train.progress=false", "train.device=cpu",
        f"distill.teacher={TEACHER}", f"distill.teacher_checkpoint={teacher}",
        f"distill.cache_dir={tmp_path / 'cache'}", "distill.cache_mode=views",
        "distill.num_views=3", "distill.topk=2",
        "distill.shard_size=6", "distill.type=hard", "distill.source=cache",
        f"train.output_dir={tmp_path / 'run'}", *extra])


class PoisonedLoss:
    """Cross-entropy, NaN on the calls listed in `bad` (0-based)."""

    def __init__(self, bad):
        self.bad, self.calls, self.loss = set(bad), 0, DistillationLoss()

    def __call__(self, *args):
        loss = self.loss(*args)
        self.calls += 1
        return loss * float("nan") if self.calls - 1 in self.bad else loss


def tensor_trainer(tmp_path, bad, *extra, precision="fp32"):
    """A one-block micro DeiT Trainer on 24 random tensors whose loss is NaN at `bad` calls."""
    torch.manual_seed(0)
    cfg = load_config(None, ["model.name=deit_micro_patch4_32", "train.epochs=1",
                             f"train.precision={precision}", "train.log_interval=1",
                             "train.progress=false", "data.batch_size=4", "train.ema_decay=0.5",
                             f"train.output_dir={tmp_path}", *extra])
    labels = torch.arange(24) % 3
    model = create_model(cfg.model.name, num_classes=3, depth=1)
    mix = recipe_mixup(3, mixup=0.0, cutmix=0.0)
    loader = TensorLoader(torch.randn(24, 3, 32, 32), labels, cfg.data.batch_size)
    return Trainer(cfg, model, loader, None, PoisonedLoss(bad), mix, torch.device("cpu"),
                   tmp_path)
