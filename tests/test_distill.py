from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deit_fast.cache_teacher import cache_teacher
from deit_fast.config import load_config
from deit_fast.data_pipeline.teacher_cache import ShardWriter, TeacherCache, manifest_header
from deit_fast.losses import DistillationLoss
from deit_fast.models import create_model
from deit_fast.run import train
from deit_fast.teacher import TeacherTargets
from deit_fast.train import Trainer
from tests.helpers import recipe_mixup, teacher_setup

B, C = 6, 5


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def hand_soft(student: np.ndarray, teacher_probs: np.ndarray, tau: float) -> float:
    """sum p_t * log(p_t / p_s) at temperature tau, * tau^2 / (B * C), as DeiT's code."""
    p_s = softmax(student / tau)
    return float((teacher_probs * np.log(teacher_probs / p_s)).sum() * tau**2 / student.size)


def hand_hard(student: np.ndarray, teacher_scores: np.ndarray) -> float:
    picked = softmax(student)[np.arange(len(student)), teacher_scores.argmax(axis=1)]
    return float(-np.log(picked).mean())


def hand_ce(logits: np.ndarray, targets: np.ndarray) -> float:
    return float(-(targets * np.log(softmax(logits))).sum(axis=1).mean())


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, C, generator=g, dtype=torch.float64) * 2 for _ in range(3)]


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_matches_the_hand_computation_online_and_cached(logits, tau):
    cls, dist, teacher = logits
    targets = torch.softmax(torch.randn(B, C, dtype=torch.float64), dim=1)
    loss = DistillationLoss("soft", alpha=0.3, tau=tau)
    t_probs = softmax(teacher.numpy() / tau)
    expected = 0.7 * hand_ce(cls.numpy(), targets.numpy()) + \
        0.3 * hand_soft(dist.numpy(), t_probs, tau)
    online_teacher = TeacherTargets("soft", tau, C, teacher=lambda images: teacher)
    online = loss((cls, dist), targets,
                  online_teacher(None, torch.zeros(B, 3, 4, 4), None, None))
    cached = loss((cls, dist), targets, torch.from_numpy(t_probs))
    assert online.item() == pytest.approx(expected, rel=1e-5)
    assert cached.item() == pytest.approx(expected, rel=1e-5)


def test_hard_matches_the_hand_computation_and_uses_the_class_head_without_token(logits):
    cls, dist, teacher = logits
    targets = torch.softmax(torch.randn(B, C, dtype=torch.float64), dim=1)
    loss = DistillationLoss("hard", alpha=0.5)
    online = TeacherTargets("hard", 3.0, C, teacher=lambda images: teacher)
    assert online.target_tau == 1.0  # hard distillation takes the argmax at tau 1
    teacher_targets = online(None, torch.zeros(B, 3, 4, 4), None, None)
    base, distill = loss.components((cls, dist), targets, teacher_targets)
    assert base.item() == pytest.approx(hand_ce(cls.numpy(), targets.numpy()), rel=1e-5)
    assert distill.item() == pytest.approx(hand_hard(dist.numpy(), teacher.numpy()), rel=1e-5)
    _, on_class_head = loss.components(cls, targets, teacher_targets)
    assert on_class_head.item() == pytest.approx(hand_hard(cls.numpy(), teacher.numpy()),
                                                 rel=1e-5)


def _mixing(seed=3):
    """A Mixup draw of B images (mixup only, lambda in (0, 1)) and the label targets."""
    mix = recipe_mixup(C, seed=seed, mixup=1.0, cutmix=0.0, label_smoothing=0.0)
    perm, weights = mix.params((0, 1, 0), 4, 4, B)
    assert 0 < weights[6] < 1 and perm.tolist() == list(range(B))[::-1]
    return mix, perm, weights


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_a_views_cache_is_mixed_with_the_labels_lambda_and_pairing(logits, kind):
    cls, dist, teacher = logits
    tau = 2.0 if kind == "soft" else 1.0
    t_probs = softmax(teacher.numpy() / tau)
    mix, perm, weights = _mixing()
    lam = float(weights[6])
    labels = torch.arange(B) % C
    images, targets = mix.apply(torch.zeros(B, 3, 4, 4), labels, perm, weights)
    top = torch.log_softmax(teacher, dim=-1).float().topk(C)
    batch = SimpleNamespace(teacher_values=top.values, teacher_indices=top.indices)
    mixed = TeacherTargets(kind, tau, C, cache_mode="views")(batch, images, perm, weights)
    expected_mix = lam * t_probs + (1 - lam) * t_probs[perm]
    np.testing.assert_allclose(mixed.numpy(), expected_mix, rtol=1e-5)
    one_hot = np.eye(C)[labels.numpy()]
    expected_targets = lam * one_hot + (1 - lam) * one_hot[perm]
    hand = hand_soft(dist.numpy(), expected_mix, tau) if kind == "soft" else \
        hand_hard(dist.numpy(), expected_mix)
    loss = DistillationLoss(kind, alpha=0.5, tau=tau)((cls, dist), targets, mixed)
    expected = 0.5 * hand_ce(cls.numpy(), expected_targets) + 0.5 * hand
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_distillation_without_any_teacher_is_refused(logits):
    with pytest.raises(ValueError, match="distill.type='hard' needs teacher targets"):
        DistillationLoss("hard")(tuple(logits[:2]), torch.eye(C)[torch.arange(B) % C])
    with pytest.raises(ValueError, match="the batch carries no teacher top-k"):
        TeacherTargets("hard", 1.0, C, cache_mode="batches")(
            SimpleNamespace(images=None), None, None, None)
    with pytest.raises(ValueError, match="an online teacher or a cache mode, one"):
        TeacherTargets("hard", 1.0, C)


def test_one_path_gives_the_targets_of_the_mixed_batch_for_every_source():
    """Online: the teacher runs once on the mixed images it is given; a batches cache: the
    batch's top-k at tau as it is (it was computed on the mixed images); a views cache: the
    top-k of each view at tau, mixed with the labels' lambda and pairing."""
    seen = []
    teacher = lambda images: seen.append(images) or images.mean(dim=(2, 3))[:, :C]
    mix, perm, weights = _mixing()
    mixed_images = torch.randn(B, C, 4, 4)
    probs = torch.softmax(torch.randn(B, C), dim=1)
    top = probs.log().topk(C)
    batch = SimpleNamespace(teacher_values=top.values, teacher_indices=top.indices)
    online = TeacherTargets("soft", 2.0, C, teacher=teacher)(batch, mixed_images, perm, weights)
    assert len(seen) == 1 and seen[0] is mixed_images
    torch.testing.assert_close(online,
                               torch.softmax(mixed_images.mean(dim=(2, 3)) / 2.0, dim=-1))
    at_tau = probs**0.5 / (probs**0.5).sum(dim=1, keepdim=True)
    exact = TeacherTargets("soft", 2.0, C, cache_mode="batches")(batch, None, perm, weights)
    torch.testing.assert_close(exact, at_tau)
    views = TeacherTargets("soft", 2.0, C, cache_mode="views")(batch, None, perm, weights)
    lam = float(weights[6])
    torch.testing.assert_close(views, lam * at_tau + (1 - lam) * at_tau[perm])


class RecordingLoss(DistillationLoss):
    def components(self, *args):
        base, distill = super().components(*args)
        self.seen.append((base.item(), distill.item()))
        return base, distill


class IndexedLoader:
    """Fixed in-memory batches that carry their teacher top-k from a cache (view 0)."""

    def __init__(self, images, labels, batch_size, cache):
        self.images, self.labels, self.batch_size, self.cache = images, labels, batch_size, cache
        self.steps_per_epoch, self.bad_files = len(images) // batch_size, set()
        self.items_per_step = batch_size

    def epoch(self, epoch, start_step=0, start_item=None):
        for step in range(start_step, self.steps_per_epoch):
            rows = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
            values, indices = self.cache.topk(torch.zeros_like(rows), rows)
            yield SimpleNamespace(images=self.images[rows], labels=self.labels[rows],
                                  teacher_values=values, teacher_indices=indices)


def test_a_short_distilled_run_decreases_both_losses(tmp_path):
    torch.manual_seed(0)
    n, classes = 32, 4
    labels = torch.arange(n) % classes
    images = torch.randn(classes, 3, 32, 32)[labels] + 0.5 * torch.randn(n, 3, 32, 32)
    # a teacher that disagrees with the labels: the distillation head must learn its rule
    header = manifest_header(dict(cache_mode="views", num_classes=classes, topk=2, epochs=1,
                                  repeats=1), groups=1, rows=n, shard_rows=n, forwards=n)
    writer = ShardWriter(tmp_path / "cache", header)
    values = np.log(np.tile([[0.9, 0.05]], (n, 1)))
    indices = torch.stack([(labels + 1) % classes, labels], dim=1).numpy()
    writer.write(writer.layout.shards()[0], values, indices)
    writer.finalize()
    cache = TeacherCache(tmp_path / "cache")
    cfg = load_config(None, ["model.name=deit_micro_distilled_patch4_32", "train.epochs=8",
                             "optim.lr=1e-3", "optim.scale_lr=false", "optim.warmup_epochs=0",
                             "train.precision=fp32", "train.ema=false", "train.progress=false",
                             "train.log_interval=1",
                             "data.batch_size=16", f"train.output_dir={tmp_path / 'run'}"])
    (tmp_path / "run").mkdir()
    model = create_model(cfg.model.name, num_classes=classes, depth=2)
    loss = RecordingLoss("hard", alpha=0.5)
    loss.seen = []
    mix = recipe_mixup(classes, mixup=0.0, cutmix=0.0, label_smoothing=0.0)
    trainer = Trainer(cfg, model, IndexedLoader(images, labels, 16, cache), None, loss, mix,
                      torch.device("cpu"), tmp_path / "run",
                      teacher_targets=TeacherTargets("hard", 1.0, classes, cache_mode="views"))
    trainer.fit()
    trainer.close()
    seen = np.array(loss.seen)
    assert len(seen) == 16
    first, last = seen[:2].mean(axis=0), seen[-2:].mean(axis=0)
    assert last[0] < 0.5 * first[0] and last[1] < 0.5 * first[1]


def test_train_replays_the_cache_end_to_end(tmp_path):
    cfg = teacher_setup(tmp_path, "data.batch_size=4", "data.eval_batch_size=8")
    cache_teacher(cfg)
    summary = train(cfg)
    assert summary["global_step"] == summary["epoch"] * 3 and "top1" in summary
