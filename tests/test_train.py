import json
import math

import pytest
import torch

from deit_fast import checkpoint
from deit_fast.config import load_config
from deit_fast.data_pipeline import Mixup, files
from deit_fast.distributed import Distributed
from deit_fast.ema import ModelEma
from deit_fast.losses import DistillationLoss
from deit_fast.models import create_model
from deit_fast.optim import CosineSchedule, param_groups
from deit_fast.run import train
from deit_fast.train import Trainer
from tests.helpers import TensorLoader, recipe_mixup, tiny_config, write_tiny_imagefolder


def test_schedule_at_known_steps():
    s = CosineSchedule(lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=10, total_steps=110)
    assert s(0) == pytest.approx(1e-6)
    assert s(5) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert s(10) == pytest.approx(1e-3)
    assert s(60) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # half-way down the cosine
    assert s(85) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.75)))
    assert s(110) == pytest.approx(1e-5) and s(500) == pytest.approx(1e-5)


def test_lr_scales_with_global_batch(tmp_path):
    from deit_fast.optim import scaled_lr

    cfg = load_config(None, ["optim.lr=5e-4"]).optim
    assert scaled_lr(cfg, 1024) == pytest.approx(1e-3)
    assert scaled_lr(cfg, 256) == pytest.approx(2.5e-4)


def test_no_weight_decay_on_norms_biases_tokens_and_position():
    model = create_model("deit_micro_distilled_patch4_32")
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "dist_token", "pos_embed", "blocks.0.norm1.weight", "norm.bias",
            "blocks.3.attn.qkv.bias", "head.bias"} <= skipped
    assert {names[id(p)] for p in decay["params"]} == {
        n for n, p in model.named_parameters() if n not in skipped}
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_ema_update_is_the_moving_average():
    model = torch.nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.9)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    torch.testing.assert_close(ema.module.weight, 0.9 * before + 0.1 * model.weight)


def test_a_few_steps_reduce_the_loss(tmp_path):
    torch.manual_seed(0)
    cfg = load_config(None, ["model.name=deit_micro_patch4_32", "train.epochs=6",
                             "optim.lr=1e-3", "optim.scale_lr=false", "optim.warmup_epochs=0",
                             "train.precision=fp32", "train.log_interval=1", "train.ema=false",
                             "train.progress=false", "data.batch_size=16",
                             f"train.output_dir={tmp_path}"])
    labels = torch.arange(32) % 4
    images = torch.randn(4, 3, 32, 32)[labels] + 0.5 * torch.randn(32, 3, 32, 32)
    model = create_model(cfg.model.name, num_classes=4, depth=2)
    mix = recipe_mixup(4, mixup=0.0, cutmix=0.0, label_smoothing=0.0)
    trainer = Trainer(cfg, model, TensorLoader(images, labels, 16), None, DistillationLoss(),
                      mix, torch.device("cpu"), tmp_path)
    trainer.fit()
    trainer.close()
    losses = [r["loss"] for r in map(json.loads, open(tmp_path / "metrics.jsonl"))]
    assert len(losses) == 12
    assert losses[-1] < 0.5 * losses[0]


def test_each_rank_draws_its_own_mixup(tmp_path):
    """The mixup key holds the rank: ranks mix with their own lambda and box."""
    cfg = load_config(None, ["model.name=deit_micro_patch4_32", "train.progress=false",
                             "train.precision=fp32", "train.ema=false", "data.batch_size=16",
                             f"train.output_dir={tmp_path}"])
    images, labels = torch.randn(16, 3, 32, 32), torch.arange(16) % 4
    drawn = {}

    class Recording(Mixup):
        def device_params(self, key, images):
            drawn[rank] = (key, self.draw(key, 32, 32, len(images)))
            return super().device_params(key, images)

    for rank in (0, 1):
        model = create_model(cfg.model.name, num_classes=4, depth=1)
        mix = Recording(**vars(recipe_mixup(4)))
        trainer = Trainer(cfg, model, TensorLoader(images, labels, 16), None,
                          DistillationLoss(), mix, torch.device("cpu"),
                          tmp_path / str(rank), dist=Distributed(rank=rank))
        trainer.train_step(next(trainer.train_loader.epoch(0)))
        trainer.close()
    (key0, (lam0, box0, _)), (key1, (lam1, box1, _)) = drawn[0], drawn[1]
    assert key0[:-1] == key1[:-1] and key0 != key1
    assert (lam0, box0) != (lam1, box1)


def params_of(state):
    return {k: v for k, v in state["model"].items()}


def test_resume_is_exact(tmp_path):
    data = tmp_path / "data"
    write_tiny_imagefolder(data)
    straight = train(tiny_config(data, tmp_path / "straight", "train.max_steps=8"))
    assert straight["global_step"] == 8
    first = train(tiny_config(data, tmp_path / "resumed", "train.max_steps=4"))
    assert first["global_step"] == 4
    resumed = train(tiny_config(data, tmp_path / "resumed", "train.max_steps=8"))
    assert resumed["global_step"] == 8
    a = checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    exp_avg = [s["exp_avg"] for s in a["optimizer"]["state"].values()]
    assert all(torch.equal(x, s["exp_avg"]) for x, s in
               zip(exp_avg, b["optimizer"]["state"].values()))
    assert (a["epoch"], a["step_in_epoch"]) == (b["epoch"], b["step_in_epoch"])


def test_run_directory_holds_config_metrics_curves_checkpoints(tmp_path):
    data = tmp_path / "data"
    write_tiny_imagefolder(data)
    out = tmp_path / "run"
    summary = train(tiny_config(data, out, "train.epochs=2"))
    assert {"top1", "top5", "ema_top1", "ema_top5"} <= set(summary)
    assert (out / "config.yaml").is_file() and (out / "curves.png").is_file()
    assert (out / "checkpoints" / "last.pt").is_file()
    assert (out / "checkpoints" / "best.pt").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train_rows = [r for r in records if "loss" in r]
    eval_rows = [r for r in records if "top1" in r]
    assert train_rows and {"epoch", "step", "loss", "lr", "img_per_s"} <= set(train_rows[0])
    assert [r["epoch"] for r in eval_rows] == [1, 2] == [1, summary["epoch"]]  # from 1
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in eval_rows)
    state = checkpoint.load(out / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and state["model_name"] == "deit_micro_patch4_32"


def test_resume_refuses_checkpoint_of_another_model(tmp_path):
    data = tmp_path / "data"
    write_tiny_imagefolder(data)
    train(tiny_config(data, tmp_path / "run", "train.max_steps=2"))
    with pytest.raises(ValueError, match="another config: model.name: 'deit_micro_patch4_32' "
                                         "in the checkpoint, 'deit_micro_distilled_patch4_32'"):
        train(tiny_config(data, tmp_path / "run", "model.name=deit_micro_distilled_patch4_32"))


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": torch.tensor(1)}, path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", disk_full)
    with pytest.raises(OSError, match="could not write checkpoint .*last.pt.*No space left.*"
                                      "previous checkpoint is unchanged"):
        checkpoint.save_atomic({"step": torch.tensor(2)}, path)
    assert checkpoint.load(path)["step"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left over


def test_missing_data_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path .*nowhere.* does not exist"):
        train(tiny_config(tmp_path / "nowhere", tmp_path / "run"))
    with pytest.raises(ValueError, match="data.path: no dataset given"):
        train(load_config(None, ["train.device=cpu"]))


def test_epoch_ends_before_the_first_log_line(tmp_path):
    data = tmp_path / "data"
    write_tiny_imagefolder(data)
    summary = train(tiny_config(data, tmp_path / "run", "train.epochs=1",
                                "train.log_interval=1000"))
    assert "top1" in summary and (tmp_path / "run" / "curves.png").is_file()
