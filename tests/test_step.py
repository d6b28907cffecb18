"""Trainer.train_step: no host sync per step, the gradient guard, compile against eager,
gradient accumulation against the full batch."""

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deit_fast.config import ConfigError, load_config
from deit_fast.evaluate import evaluate
from deit_fast.losses import DistillationLoss
from deit_fast.models import create_model
from deit_fast.ops import KernelChoice
from deit_fast.resolve import build_mixup
from deit_fast.teacher import TeacherTargets
from deit_fast.train import Trainer

aten = torch.ops.aten
CLASSES = 5
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

# Ops that make the host wait for a device value: a scalar read (.item(), bool(t),
# float(t)), a comparison answered on the host, or an output shape set by the data.
SYNC_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default,
            aten.equal.default, aten.allclose.default, aten.nonzero.default,
            aten.masked_select.default, aten._unique2.default, aten.unique_consecutive.default,
            aten.unique_dim.default}


class SyncCount(TorchDispatchMode):
    """Counts SYNC_OPS, and copies of a device tensor to the host (.cpu(), .tolist() on a
    GPU; on the CPU those are no copy and no wait)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        to_host = func in (aten._to_copy.default, aten.copy_.default) and any(
            isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args[1:2] or args
        ) and isinstance(out, torch.Tensor) and out.device.type == "cpu"
        if func in SYNC_OPS or to_host:
            self.ops[str(func)] = self.ops.get(str(func), 0) + 1
        return out

    @property
    def total(self) -> int:
        return sum(self.ops.values())


class Loader:
    """Fixed batches on the device, carrying a teacher cache's top-3 as the loaders do."""

    def __init__(self, steps: int, batch: int, device: str, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.batches = []
        for _ in range(steps):
            top = torch.log_softmax(torch.randn(batch, CLASSES, generator=g), -1).topk(3, -1)
            self.batches.append(SimpleNamespace(
                images=torch.randn(batch, 3, 32, 32, generator=g).to(device),
                labels=torch.randint(0, CLASSES, (batch,), generator=g).to(device),
                teacher_values=top.values.half().to(device),
                teacher_indices=top.indices.to(device)))
        self.steps_per_epoch, self.items_per_step, self.bad_files = steps, batch, set()

    def epoch(self, epoch, start_step=0, start_item=None):
        yield from self.batches[start_step:]


def make_trainer(tmp_path, loader, *overrides, device="cpu", kernels=None, **shape):
    cfg = load_config(None, [
        "model.name=deit_micro_distilled_patch4_32", "model.drop_path=0.1",
        "data.batch_size=8", "train.precision=fp32", "train.ema_decay=0.9",
        "train.progress=false", "train.log_interval=1000", "train.epochs=1",
        "distill.type=hard", "distill.source=cache", "distill.cache_dir=unused",
        f"train.output_dir={tmp_path}", *overrides])
    torch.manual_seed(0)
    model = create_model(cfg.model.name, num_classes=CLASSES, kernels=kernels,
                         drop_path_rate=cfg.model.drop_path, **{"depth": 1, **shape}).to(device)
    mix = build_mixup(cfg.data, CLASSES)
    criterion = DistillationLoss(cfg.distill.type, cfg.distill.alpha, cfg.distill.tau)
    return Trainer(cfg, model, loader, None, criterion, mix, torch.device(device), tmp_path,
                   teacher_targets=TeacherTargets(cfg.distill.type, cfg.distill.tau, CLASSES,
                                                  cache_mode="views"))


def run_steps(trainer, batches):
    """train_step as fit() runs it, without the loop around it: (loss, bad, updated) each."""
    out = []
    for batch in batches:
        loss, bad = trainer.train_step(batch)
        out.append((loss.item(), bad.item(), trainer.updated))
        trainer.step_in_epoch += 1
    return out


def syncs_of_a_run(tmp_path, steps: int, device: str) -> SyncCount:
    trainer = make_trainer(tmp_path / str(steps), Loader(steps, 8, device), device=device)
    with SyncCount() as count:
        summary = trainer.fit()
    trainer.close()
    assert summary["global_step"] == steps
    return count


@pytest.mark.parametrize("device", DEVICES)
def test_no_host_sync_per_step(tmp_path, device):
    """Mixup and CutMix, EMA, cached hard distillation, drop path, the NaN guard: the syncs
    of a run (its end: the bad-step check and the checkpoint) do not grow with its length."""
    short, long = (syncs_of_a_run(tmp_path, n, device) for n in (6, 18))
    assert (long.total - short.total) / 12 == 0, (short.ops, long.ops)


def test_the_sync_count_sees_a_sync(tmp_path):
    """The counter is not blind: an .item() per step shows as one per step."""
    trainer = make_trainer(tmp_path, Loader(3, 8, "cpu"))
    step = trainer.train_step
    trainer.train_step = lambda batch: (lambda out: (out[0].item(), out)[1])(step(batch))
    with SyncCount() as count:
        trainer.fit()
    trainer.close()
    assert count.ops.get("aten._local_scalar_dense.default", 0) >= 3


def _snapshot(trainer):
    return [{k: v.clone() for k, v in trainer.model.state_dict().items()},
            {k: v.clone() for k, v in trainer.step.ema.state_dict().items()},
            *({k: v.clone() for k, v in s.items()} for s in trainer.step.optimizer.state.values())]


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_gradient_with_a_finite_loss_is_skipped_and_counted(tmp_path, value):
    loader = Loader(4, 8, "cpu")
    trainer = make_trainer(tmp_path, loader, "train.log_interval=1")
    poison = {"step": 2}

    def hook(grad):  # one element of one weight's gradient, at step 2 only
        if trainer.step_in_epoch != poison["step"]:
            return grad
        grad = grad.clone()
        grad[0, 1] = value
        return grad

    trainer.model.blocks[0].attn.qkv.weight.register_hook(hook)
    losses, flags = [], []
    for i, batch in enumerate(loader.batches):
        before = _snapshot(trainer)
        [(loss, bad, _)] = run_steps(trainer, [batch])
        losses.append(loss)
        flags.append(bad)
        unchanged = [all(torch.equal(a[k], b[k]) for k in a)
                     for a, b in zip(before, _snapshot(trainer))]
        if i > 0:  # the first step creates the optimizer state, so nothing to compare
            assert all(unchanged) == (i == poison["step"]), i
    assert all(torch.isfinite(torch.tensor(losses)))
    assert flags == [0.0, 0.0, 1.0, 0.0]
    assert trainer.bad.total.item() == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_the_guard_is_counted_in_the_log(tmp_path):
    trainer = make_trainer(tmp_path, Loader(4, 8, "cpu"), "train.log_interval=1")
    trainer.model.head.weight.register_hook(
        lambda g: g * float("inf") if trainer.step_in_epoch in (1, 2) else g)
    summary = trainer.fit()
    trainer.close()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["bad_steps"] for r in records if "loss" in r] == [0, 1, 2, 2]
    assert summary["bad_steps"] == 2


def test_compiled_losses_equal_eager(tmp_path):
    """train.compile=default (inductor, torch kernels) over 20 steps with mixup, EMA and
    distillation: losses within 1e-4 relative of eager (fp32; summation order differs),
    and the compiled evaluation model agrees too."""
    results = {}
    for mode in ("none", "default"):
        loader = Loader(20, 8, "cpu")
        trainer = make_trainer(tmp_path / mode, loader, f"train.compile={mode}",
                               "model.drop_path=0.0", "optim.warmup_epochs=0",
                               "optim.lr=2e-3")
        start = trainer.model.head.weight.detach().clone()
        losses = [loss for loss, _, _ in run_steps(trainer, loader.batches)]
        val = [(b.images, b.labels) for b in loader.batches[:2]]
        results[mode] = (losses, evaluate(trainer.step.eval_model, val, trainer.device),
                         start, trainer.model.head.weight.detach().clone())
        assert isinstance(trainer.step.eval_model, torch._dynamo.eval_frame.OptimizedModule) == (
            mode == "default")
        trainer.close()
    (eager, eager_eval, start, eager_end), (compiled, compiled_eval, _, compiled_end) = (
        results["none"], results["default"])
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-5)
    assert compiled_eval["top1"] == eager_eval["top1"]
    assert compiled_eval["val_loss"] == pytest.approx(eager_eval["val_loss"], rel=1e-4)
    torch.testing.assert_close(compiled_end, eager_end, rtol=0, atol=1e-5)
    assert (eager_end - start).abs().max() > 1e-4  # the 20 updates moved the weights


def _after_one_update(tmp_path, batch_size, accum):
    loader = Loader(32 // batch_size, batch_size, "cpu")
    big = Loader(1, 32, "cpu")  # the same 32 images, in one batch or split
    for i, part in enumerate(loader.batches):
        for name in ("images", "labels", "teacher_values", "teacher_indices"):
            setattr(part, name, getattr(big.batches[0], name)[i * batch_size:][:batch_size])
    trainer = make_trainer(tmp_path, loader, f"data.batch_size={batch_size}",
                           f"train.accum_steps={accum}", "model.drop_path=0.0",
                           "data.mixup=0.0", "data.cutmix=0.0", "distill.type=soft",
                           "optim.lr=5e-4", "optim.warmup_epochs=0")
    flags = [(bad, updated) for _, bad, updated in run_steps(trainer, loader.batches)]
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return trainer, grads, flags


def test_two_accumulated_half_batches_equal_one_batch(tmp_path):
    """fp32, no dropout or drop path: 2 x 16 with train.accum_steps=2 is one update of 32,
    with the lr scaled on the effective batch of 32 (an update moves weights by ~3e-5)."""
    whole, whole_grads, whole_flags = _after_one_update(tmp_path / "32", 32, 1)
    split, split_grads, split_flags = _after_one_update(tmp_path / "16", 16, 2)
    assert whole_flags == [(0.0, True)] and split_flags == [(0.0, False), (0.0, True)]
    assert split.step.lr.item() == pytest.approx(whole.step.lr.item()) == \
        pytest.approx(5e-4 * 32 / 512)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(split_grads[name], grad, atol=1e-6, rtol=1e-5)
    for a, b in zip(split.model.state_dict().values(), whole.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for a, b in zip(split.step.ema.state_dict().values(), whole.step.ema.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    split.close()
    whole.close()


def test_accumulating_micro_batches_skip_the_ddp_all_reduce(tmp_path):
    """With DDP, no_sync covers every micro-batch but the last of an update."""
    loader = Loader(5, 8, "cpu")  # an epoch of 5: updates of 2, 2 and the last 1
    trainer = make_trainer(tmp_path, loader, "train.accum_steps=2")
    entered = []

    class Reducer:
        @contextlib.contextmanager
        def no_sync(self):
            entered.append(trainer.step_in_epoch)
            yield

    trainer.step.ddp = Reducer()
    updates = [updated for _, _, updated in run_steps(trainer, loader.batches)]
    trainer.close()
    assert entered == [0, 2] and updates == [False, True, False, True, True]


def test_checkpoints_and_max_steps_fall_on_update_ends_in_every_epoch(tmp_path, monkeypatch):
    """7 steps an epoch, updates of 2: the update ends are 2, 4, 6, 7 in epoch 0 and 9, 11,
    13, 14 in epoch 1, between the multiples of checkpoint_interval=2; each checkpoint waits
    for the update end after its multiple, and so does max_steps=12."""
    loader = Loader(7, 4, "cpu")
    trainer = make_trainer(tmp_path, loader, "data.batch_size=4", "train.accum_steps=2",
                           "train.checkpoint_interval=2", "train.epochs=3", "train.max_steps=12",
                           "optim.warmup_epochs=0")
    saved = []
    monkeypatch.setattr(trainer, "save", lambda name="last.pt": saved.append(
        (trainer.global_step, trainer.step_in_epoch, name)))
    summary = trainer.fit()
    trainer.close()
    assert [(step, name) for step, _, name in saved] == [
        (2, "last.pt"), (4, "last.pt"), (6, "last.pt"), (7, "last.pt"),  # 7: the epoch's end
        (9, "last.pt"), (11, "last.pt"), (13, "last.pt")]  # 13: max_steps, at the update end
    assert summary["global_step"] == 13


def test_step_keys_that_cannot_combine_are_refused():
    with pytest.raises(ConfigError, match="train.cuda_graphs: .* train.accum_steps > 1"):
        load_config(None, ["train.accum_steps=2", "train.cuda_graphs=true"])
    with pytest.raises(ConfigError, match="train.compile: 'fast' is not one of none, default"):
        load_config(None, ["train.compile=fast"])
    with pytest.raises(ConfigError, match="train.accum_steps: must be >= 1"):
        load_config(None, ["train.accum_steps=0"])


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda_graphs"])
def test_steps_run_under_sync_debug_error(tmp_path, graphs):
    """On the GPU, with the Triton kernels: a step that waits for the device raises."""
    loader = Loader(8, 8, "cuda")
    trainer = make_trainer(tmp_path, loader, "train.precision=bf16",
                           f"train.cuda_graphs={graphs}", device="cuda",
                           kernels=KernelChoice("triton", "triton", "triton"), embed_dim=192)
    run_steps(trainer, loader.batches[:4])  # warm-up (and the capture, after three)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in loader.batches[4:]:
            trainer.train_step(batch)
            trainer.step_in_epoch += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.bad.total.item() == 0
    trainer.close()


@pytest.mark.gpu
def test_cuda_graph_step_equals_eager(tmp_path):
    """train.cuda_graphs replays the eager step: the same losses, weights and EMA (fp32,
    no drop path, whose random masks the graph draws from another offset)."""
    results = {}
    for graphs in (False, True):
        loader = Loader(10, 8, "cuda")
        trainer = make_trainer(tmp_path / str(graphs), loader, "model.drop_path=0.0",
                               f"train.cuda_graphs={graphs}", "optim.warmup_epochs=0",
                               device="cuda")
        losses = [loss for loss, _, _ in run_steps(trainer, loader.batches)]
        results[graphs] = losses, trainer.model.state_dict(), trainer.step.ema.state_dict()
        trainer.close()
    (eager, weights, ema), (graphed, graphed_weights, graphed_ema) = results.values()
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=1e-4, atol=1e-5)
    for a, b in ((weights, graphed_weights), (ema, graphed_ema)):
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["deit_micro_patch4_32", "deit_micro_distilled_patch4_32"])
def test_flops_per_image_equal_torch_flop_counter(name):
    """deit_fast.flops' formula against torch's FlopCounterMode over a training forward and
    backward (eager attention, so both attention matmuls are counted as bmm)."""
    from torch.utils.flop_counter import FlopCounterMode

    from deit_fast.flops import train_flops_per_image

    model = create_model(name, num_classes=7, kernels=KernelChoice("eager", "torch", "torch"))
    images = torch.randn(3, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        outputs = model(images)
        sum(o.sum() for o in (outputs if isinstance(outputs, tuple) else (outputs,))).backward()
    assert train_flops_per_image(model) == counter.get_total_flops() / 3
    assert train_flops_per_image(torch.nn.Linear(2, 2)) is None
    assert train_flops_per_image(create_model("deit_small_patch16_224")) == pytest.approx(
        27.5e9, rel=0.01)  # the docstring's DeiT-S


def test_metrics_log_mfu_beside_img_per_s(tmp_path):
    from deit_fast.flops import train_flops_per_image

    for peak, expect_mfu in ((None, False), (2.5, True)):
        extra = [] if peak is None else [f"train.peak_tflops={peak}"]
        run = tmp_path / str(peak)
        trainer = make_trainer(run, Loader(2, 8, "cpu"), "train.log_interval=1", *extra)
        trainer.fit()
        trainer.close()
        [first, *_] = [json.loads(line) for line in open(run / "metrics.jsonl")]
        assert first["img_per_s"] > 0
        if expect_mfu:
            flops = train_flops_per_image(trainer.model)
            assert first["mfu"] == pytest.approx(flops * first["img_per_s"] / 2.5e12)
        else:
            assert first["mfu"] is None  # a CPU has no known peak


def test_accumulation_under_ddp_equals_one_process(tmp_path):
    """Two gloo ranks of batch 2 with train.accum_steps=2 (no_sync on the first micro-batch)
    make the same two updates as one process with batch 8."""
    from deit_fast import checkpoint
    from deit_fast.run import train
    from tests.helpers import EXACT_DATA, overrides, tiny_config, torchrun, write_tiny_imagefolder

    data = tmp_path / "data"
    write_tiny_imagefolder(data, classes=2, per_class=16)  # 32 images: 4 updates of 8 an epoch
    ranks = torchrun("--at", "1000", "--", *overrides(
        data, tmp_path / "ddp", *EXACT_DATA, "data.batch_size=2", "train.accum_steps=2",
        "train.max_steps=4"))
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    train(tiny_config(data, tmp_path / "one", *EXACT_DATA, "data.batch_size=8",
                      "train.max_steps=2"))
    a, b = (checkpoint.load(tmp_path / run / "checkpoints" / "last.pt") for run in ("ddp", "one"))
    assert a["item_in_epoch"] == b["item_in_epoch"] == 16
    for key in a["model"]:  # AdamW turns float-summation noise into ~2e-5 (see test_distributed)
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-4)
        torch.testing.assert_close(a["ema"][key], b["ema"][key], rtol=0, atol=1e-4)


class OpTrace(TorchDispatchMode):
    """Every op with its output shapes: what a CUDA graph would capture."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((str(func), tuple(tuple(o.shape) for o in outs
                                          if isinstance(o, torch.Tensor))))
        return out


def test_every_step_runs_the_same_ops_on_the_same_shapes(tmp_path):
    """What train.cuda_graphs needs, checked on the CPU: Mixup, CutMix (boxes of every size)
    and unmixed batches, skipped and applied updates all run one op sequence, so one capture
    replays them all."""
    loader = Loader(12, 8, "cpu")
    trainer = make_trainer(tmp_path, loader, "data.mixup_prob=0.7")
    trainer.model.head.weight.register_hook(  # a skipped update among them (same op each step)
        lambda g: g * (float("inf") if trainer.step_in_epoch == 5 else 1.0))
    run_steps(trainer, loader.batches[:1])  # the first update creates the optimizer state
    kinds, traces = set(), []
    for batch in loader.batches[1:]:
        _, box, perm = trainer.step.mix.draw((0, trainer.step_in_epoch, 0), 32, 32, 8)
        kinds.add("none" if perm is None else "mixup" if box is None else "cutmix")
        with OpTrace() as trace:
            run_steps(trainer, [batch])
        traces.append(trace.ops)
    trainer.close()
    assert kinds == {"none", "mixup", "cutmix"} and trainer.bad.total.item() == 1
    assert all(t == traces[0] for t in traces[1:])


def test_evaluation_reads_the_device_once(tmp_path):
    """The sums stay on the device: 2 and 6 batches cost the same syncs (the final read)."""
    model = create_model("deit_micro_patch4_32", num_classes=CLASSES, depth=1)
    counts = []
    for batches in (2, 6):
        loader = [(b.images, b.labels) for b in Loader(batches, 4, "cpu").batches]
        with SyncCount() as count:
            result = evaluate(model, loader, torch.device("cpu"))
        counts.append(count.total)
        assert 0 <= result["top1"] <= result["top5"] <= 100
    assert counts[0] == counts[1]


class _StopAt:
    """A stop request that turns on once `trainer` has run `step` loader batches."""

    def __init__(self, step):
        self.step, self.trainer = step, None

    def __bool__(self):
        return self.trainer.global_step >= self.step


def test_a_stop_waits_for_the_end_of_an_accumulated_update(tmp_path):
    loader = Loader(6, 4, "cpu")
    trainer = make_trainer(tmp_path, loader, "data.batch_size=4", "train.accum_steps=3",
                           "optim.warmup_epochs=0")
    trainer.stop = _StopAt(1)
    trainer.stop.trainer = trainer
    summary = trainer.fit()  # asked to stop after batch 1: the update ends at batch 3
    trainer.close()
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert summary["stopped"] and summary["global_step"] == saved["global_step"] == 3
