"""A batches cache (distill.cache_mode=batches) gives the loss what the online teacher gives
it: the teacher's output on each mixed batch, step for step, through a resume."""

import json
import re
from pathlib import Path

import pytest
import timm
import torch

from deit_fast.cache_teacher import cache_teacher
from deit_fast.config import load_config
from deit_fast.data_pipeline import DatasetIndex, build_train_loader, build_val_loader
from deit_fast.data_pipeline.teacher_cache import TeacherCache, TeacherCacheMismatch
from deit_fast.resolve import build_mixup, train_loading
from deit_fast.run import open_teacher_cache, train
from deit_fast.teacher import TeacherTargets
from tests.helpers import TEACHER, deit_fast, val_loading, write_tiny_imagefolder

CLASSES = 3
TARGETS = TeacherTargets.__call__  # the one path of teacher targets, recorded around


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """15 images of 3 classes and a timm teacher fitted to them, so that it tells the images
    apart (a random network maps them all to one class: mixing before or after it would
    then look the same)."""
    root = tmp_path_factory.mktemp("batches")
    write_tiny_imagefolder(root / "data", classes=CLASSES, per_class=5, size=36)
    torch.manual_seed(0)
    teacher = timm.create_model(TEACHER, num_classes=CLASSES)
    loader = build_val_loader(DatasetIndex.from_folder(root / "data", split="train"), **val_loading(
        image_size=32, batch_size=15, num_workers=0))
    images, labels = next(iter(loader))
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(teacher(images), labels).backward()
        optimizer.step()
    torch.save(teacher.state_dict(), root / "teacher.pt")
    return root


def config(root: Path, name: str, *extra: str):
    """2 epochs of 3 steps (15 images, repeats 2, batch 4), the recipe's Mixup 0.8 / CutMix
    1.0, RandAugment and erasing; the whole distribution cached (top-3 of 3 classes)."""
    return load_config(None, [
        "model.name=deit_micro_distilled_patch4_32", f"data.path={root / 'data'}",
        "data.batch_size=4", "data.eval_batch_size=8", "data.num_workers=0", "data.repeats=2",
        "data.reprob=0.25", "train.epochs=2", "train.precision=fp32", "train.device=cpu",
        "train.progress=false", "train.ema=false", f"train.output_dir={root / name}",
        f"distill.teacher={TEACHER}", f"distill.teacher_checkpoint={root / 'teacher.pt'}",
        f"distill.cache_dir={root / (name + '_cache')}", "distill.topk=3", "distill.tau=3.0",
        *extra])


def recorded_targets(monkeypatch, *runs) -> list[torch.Tensor]:
    """The teacher targets each training step of `runs` (callables, one after another) gave
    the loss, in order."""
    seen = []

    def recording(self, *args):
        out = TARGETS(self, *args)
        seen.append(out.detach().clone())
        return out

    monkeypatch.setattr(TeacherTargets, "__call__", recording)
    for run in runs:
        run()
    return seen


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_cached_targets_equal_the_online_teachers_on_every_step(setup, monkeypatch, kind):
    online = config(setup, f"online_{kind}", f"distill.type={kind}", "distill.source=online")
    expected = recorded_targets(monkeypatch, lambda: train(online))
    cached = config(setup, f"cached_{kind}", f"distill.type={kind}", "distill.source=cache")
    cache_teacher(cached)
    stopped = config(setup, f"cached_{kind}", f"distill.type={kind}", "distill.source=cache",
                     "train.max_steps=4")  # stops in epoch 1; the same command resumes
    got = recorded_targets(monkeypatch, lambda: train(stopped), lambda: train(cached))
    assert len(got) == len(expected) == 6
    for step, (g, e) in enumerate(zip(got, expected)):
        # the cache holds float16 log-probabilities of the same teacher on the same images
        torch.testing.assert_close(g, e, atol=2e-3, rtol=0, msg=f"step {step}")
        assert torch.equal(g.argmax(1), e.argmax(1)), f"step {step}"
    assert len({int(c) for e in expected for c in e.argmax(1)}) > 1  # the teacher tells apart
    if kind == "soft":  # a views cache mixes after the teacher: not the same targets
        views = config(setup, "views", "distill.type=soft", "distill.source=cache",
                       "distill.cache_mode=views")
        cache_teacher(views)
        approximated = recorded_targets(monkeypatch, lambda: train(views))
        assert max((a - e).abs().max() for a, e in zip(approximated, expected)) > 0.05


def test_each_rank_reads_the_teacher_on_its_own_mixed_batch(setup):
    """A cache of two ranks' batches: rank r's loader hands each step the teacher's top-k on
    its batch mixed with the draw of (epoch, step, r)."""
    cfg = config(setup, "ranks", "distill.type=soft", "distill.source=cache",
                 "data.batch_size=2")
    for rank in (0, 1):
        cache_teacher(cfg, rank=rank, world_size=2)
    cache = TeacherCache(cfg.distill.cache_dir)
    assert (cache.manifest["world_size"], cache.manifest["batch_size"]) == (2, 2)
    teacher = timm.create_model(TEACHER, num_classes=CLASSES)
    teacher.load_state_dict(torch.load(setup / "teacher.pt", weights_only=True))
    teacher.eval()
    index = DatasetIndex.from_folder(cfg.data.path, split="train")
    mixup = build_mixup(cfg.data, CLASSES, cfg.train.seed)
    for rank in (0, 1):
        loader = build_train_loader(index, **train_loading(cfg, torch.device("cpu")),
                                    rank=rank, world_size=2, teacher_cache=cache)
        for epoch in (0, 1):
            for step, batch in enumerate(loader.epoch(epoch)):
                images = mixup.mix_images(batch.images,
                                          *mixup.device_params((epoch, step, rank), batch.images))
                with torch.no_grad():
                    top = torch.log_softmax(teacher(images), dim=-1).topk(3)
                # float16 log-probabilities: relative rounding 2^-11
                torch.testing.assert_close(batch.teacher_values, top.values, atol=1e-3,
                                           rtol=1e-3)
                assert torch.equal(batch.teacher_indices, top.indices)


def test_a_batches_cache_refuses_another_batch_layout(setup):
    cfg = config(setup, "layout", "distill.type=hard", "distill.source=cache")
    cache_teacher(cfg)
    index = DatasetIndex.from_folder(cfg.data.path, split="train")
    cpu = torch.device("cpu")
    accumulated = config(setup, "layout", "distill.type=hard", "distill.source=cache",
                         "train.accum_steps=3")  # groups batches into updates, changes none
    assert open_teacher_cache(accumulated, index, cpu) is not None
    for extra, message in ((["data.batch_size=2"], "field 'batch_size' is 4 in the cache, 2"),
                           (["data.cutmix=0.0"], "field 'mixup'"),
                           (["distill.cache_mode=views"], "field 'cache_mode' is 'batches'")):
        other = config(setup, "layout", "distill.type=hard", "distill.source=cache", *extra)
        with pytest.raises(TeacherCacheMismatch, match=message):
            open_teacher_cache(other, index, cpu)
    with pytest.raises(TeacherCacheMismatch, match="field 'world_size' is 1 in the cache, 2"):
        open_teacher_cache(cfg, index, cpu, world_size=2)


def test_the_printed_forwards_and_size_are_what_is_written(setup):
    """Through the command line: the header's forwards and bytes equal the manifest's and the
    shards'; the same command again finds the cache complete and computes nothing."""
    cfg = config(setup, "cli", "distill.type=hard", "distill.source=cache", "distill.topk=2")
    args = ["cache-teacher", f"data.path={cfg.data.path}",
            "model.name=deit_micro_distilled_patch4_32", "data.batch_size=4", "data.repeats=2",
            "data.num_workers=0", "train.epochs=2", "train.precision=fp32", "distill.topk=2",
            f"distill.teacher={TEACHER}", f"distill.teacher_checkpoint={setup / 'teacher.pt'}",
            f"distill.cache_dir={cfg.distill.cache_dir}", "train.progress=false"]
    first = deit_fast(*args)
    assert first.returncode == 0, first.stderr
    header = re.search(r"([\d,]+) teacher forwards \(2 epochs x 3 steps x 1 rank\(s\) x 4 "
                       r"mixed images.*\(([\d,]+) bytes\)", first.stdout)
    assert header, first.stdout
    forwards, size = (int(g.replace(",", "")) for g in header.groups())
    manifest = json.loads((Path(cfg.distill.cache_dir) / "manifest.json").read_text())
    assert forwards == manifest["forwards"] == 2 * 3 * 4
    assert size == sum(p.stat().st_size for p in Path(cfg.distill.cache_dir).glob("*.bin"))
    again = deit_fast(*args)
    assert again.returncode == 0, again.stderr
    assert "2 of 2 shards are already written; nothing left to compute" in again.stdout
