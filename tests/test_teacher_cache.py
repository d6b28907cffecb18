import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from deit_fast.cache_teacher import cache_teacher
from deit_fast.config import ConfigError, load_config
from deit_fast.data_pipeline import DatasetIndex, build_train_loader
from deit_fast.data_pipeline.teacher_cache import (
    MANIFEST,
    ShardWriter,
    TeacherCache,
    TeacherCacheError,
    TeacherCacheMismatch,
    manifest_header,
    rebuild_distribution,
)
from deit_fast.resolve import plan_params
from deit_fast.run import open_teacher_cache
from tests.helpers import TEACHER, deit_fast, teacher_setup, train_loading


def header(**changes):
    """A views cache's manifest header: 3 views of 7 samples in shards of 3, top-2 of 5."""
    identity = dict(cache_mode="views", dataset_fingerprint="abc", num_samples=7, seed=0,
                    plan={"image_size": 32}, repeats=1, num_classes=5, teacher="t",
                    teacher_checkpoint_sha256="00", num_views=3, topk=2, epochs=3,
                    views_backend="torch")
    identity.update(changes)
    return manifest_header(identity, groups=identity["num_views"],
                           rows=identity["num_samples"], shard_rows=3, forwards=21)


def write_random_cache(folder: Path, **changes):
    """A complete cache of random top-k; returns the (values, indices) written, [V, N, k]."""
    h = header(**changes)
    rng = np.random.default_rng(0)
    shape = (h["groups"], h["rows"], h["topk"])
    values = -rng.random(shape).astype(np.float16) * 5
    indices = rng.integers(0, h["num_classes"], shape).astype(np.int16)
    writer = ShardWriter(folder, h)
    for s in writer.layout.shards():
        rows = slice(s.first_row, s.first_row + s.count)
        writer.write(s, values[s.group, rows], indices[s.group, rows])
    assert writer.finalize()
    return values, indices


def test_shard_round_trip(tmp_path):
    values, indices = write_random_cache(tmp_path)
    cache = TeacherCache(tmp_path)
    assert len(json.loads((tmp_path / MANIFEST).read_text())["shards"]) == 3 * 3
    views, samples = torch.tensor([0, 2, 1, 2, 0]), torch.tensor([6, 0, 3, 5, 2])
    got_values, got_indices = cache.topk(views, samples)
    np.testing.assert_array_equal(got_values.numpy(), values[views, samples].astype(np.float32))
    np.testing.assert_array_equal(got_indices.numpy(), indices[views, samples])
    assert got_indices.dtype == torch.int64


def test_missing_view_names_the_command(tmp_path):
    write_random_cache(tmp_path)
    with pytest.raises(TeacherCacheError, match="view 3 is not in the teacher cache.*cache-"):
        TeacherCache(tmp_path).topk([3], [0])
    with pytest.raises(TeacherCacheError, match="no teacher cache.*cache-teacher"):
        TeacherCache(tmp_path / "nowhere")


def test_incomplete_cache_is_refused(tmp_path):
    writer = ShardWriter(tmp_path, header())
    shard = writer.layout.shards()[0]
    writer.write(shard, np.zeros((shard.count, 2)), np.zeros((shard.count, 2)))
    assert not writer.finalize()
    with pytest.raises(TeacherCacheError, match="incomplete"):
        TeacherCache(tmp_path)


def test_an_incomplete_pass_of_other_classes_is_replaced_naming_them(tmp_path):
    classes = [f"n{i:08d}" for i in range(5)]
    writer = ShardWriter(tmp_path, header(classes=classes))
    shard = writer.layout.shards()[0]
    writer.write(shard, np.zeros((shard.count, 2)), np.zeros((shard.count, 2)))
    renamed = [*classes[:3], "n99999999", classes[4]]
    with pytest.warns(UserWarning) as caught:
        writer = ShardWriter(tmp_path, header(classes=renamed))
    (message,) = [str(w.message) for w in caught]
    assert message == (f"teacher cache {tmp_path}: replacing an incomplete pass whose field "
                       "'classes' differs: in the cache, missing from train/: 'n00000003'; "
                       "extra in train/, not in the cache: 'n99999999'")
    assert not writer.is_complete(shard) and not list(tmp_path.glob("*_chunk*"))
    with pytest.warns(UserWarning, match="field 'seed' is 0 in the cache, 1 in the run$"):
        ShardWriter(tmp_path, header(classes=renamed, seed=1))


def test_corrupted_and_truncated_shards_are_named(tmp_path):
    write_random_cache(tmp_path)
    shard = tmp_path / "view00001_chunk00002.bin"
    data = bytearray(shard.read_bytes())
    data[3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TeacherCacheError, match="view00001_chunk00002.bin is corrupted"):
        TeacherCache(tmp_path)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(TeacherCacheError, match="view00001_chunk00002.bin is truncated"):
        TeacherCache(tmp_path)
    shard.unlink()
    with pytest.raises(TeacherCacheError, match="view00001_chunk00002.bin is missing"):
        TeacherCache(tmp_path)


@pytest.mark.parametrize("field, value", [
    ("dataset_fingerprint", "other"), ("seed", 1), ("plan", {"image_size": 64}),
    ("num_classes", 6), ("teacher", "other"), ("teacher_checkpoint_sha256", "11"),
    ("num_views", 4), ("topk", 3), ("num_samples", 8), ("repeats", 3), ("epochs", 6),
    ("views_backend", "dali-cpu"), ("cache_mode", "batches"),
])
def test_manifest_mismatch_names_the_field(tmp_path, field, value):
    write_random_cache(tmp_path)
    with pytest.raises(TeacherCacheMismatch, match=f"field '{field}'"):
        ShardWriter(tmp_path, header(**{field: value}))  # resuming into another cache


def test_a_cache_of_an_earlier_format_is_refused_with_how_to_rebuild(tmp_path):
    write_random_cache(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(TeacherCacheMismatch, match=r"another version of deit-fast \(field "
                       r"'format_version' is 2.*rebuild it.*cache-teacher"):
        TeacherCache(tmp_path)


def test_rebuilt_distribution_spreads_the_rest():
    probs = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1]])
    log_probs, indices = probs.log().topk(2)
    rebuilt = rebuild_distribution(log_probs, indices, 5)
    torch.testing.assert_close(rebuilt, probs)
    hot = rebuild_distribution(log_probs, indices, 5, tau=0.5)
    torch.testing.assert_close(hot, probs**2 / (probs**2).sum())
    assert rebuild_distribution(log_probs[:, :1], indices[:, :1], 5).argmax() == 0


# ------------------------------------------------------------------ the cache pass
def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


def cached_pairs(folder: Path) -> set[tuple[int, int]]:
    """The (view, sample) pairs whose teacher top-k the cache holds (not NOT_SHOWN rows)."""
    cache = TeacherCache(folder)
    views, samples = np.meshgrid(np.arange(cache.layout.groups), np.arange(cache.layout.rows),
                                 indexing="ij")
    pairs = set()
    for v, s in zip(views.ravel(), samples.ravel()):
        try:
            cache.topk([v], [s])
        except TeacherCacheError as err:
            assert "has no entry" in str(err)
            continue
        pairs.add((int(v), int(s)))
    return pairs


def test_interrupted_pass_resumes_to_identical_shards(tmp_path, monkeypatch):
    cfg = teacher_setup(tmp_path)
    assert cache_teacher(cfg)  # complete
    expected = shard_bytes(Path(cfg.distill.cache_dir))
    assert len(expected) == 3 * 3  # 15 samples in shards of 6, 3 views
    cfg = teacher_setup(tmp_path, f"distill.cache_dir={tmp_path / 'resumed'}")
    original, calls = ShardWriter.write, []

    def write_then_die(self, shard, values, indices):
        if len(calls) == 4:
            raise KeyboardInterrupt("preempted")
        calls.append(shard.name)
        original(self, shard, values, indices)

    monkeypatch.setattr(ShardWriter, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(cfg)
    with pytest.raises(TeacherCacheError, match="incomplete"):
        TeacherCache(tmp_path / "resumed")
    calls.append("resume")
    monkeypatch.setattr(ShardWriter, "write", lambda self, *a: calls.append(a[0].name) or
                        original(self, *a))
    cache_teacher(cfg)
    assert calls[5:] == [n for n in expected if n not in calls[:4]]  # finished ones skipped
    assert shard_bytes(tmp_path / "resumed") == expected
    TeacherCache(tmp_path / "resumed")


def test_ranks_split_the_work(tmp_path):
    cfg = teacher_setup(tmp_path)
    assert not cache_teacher(cfg, rank=1, world_size=2)  # rank 0's shards are missing
    assert len(shard_bytes(tmp_path / "cache")) == 4
    with pytest.raises(TeacherCacheError, match="incomplete"):
        TeacherCache(tmp_path / "cache")
    cache_teacher(cfg, rank=0, world_size=2)
    assert TeacherCache(tmp_path / "cache").manifest["complete"]


def replay_reads(cfg, batch_size: int) -> list[set[tuple[int, int]]]:
    """The (view, sample) pairs a run of cfg reads, epoch by epoch, through its real loader."""
    index = DatasetIndex.from_folder(cfg.data.path, split="train")
    loader = build_train_loader(index, plan_params(cfg), **train_loading(
        batch_size=batch_size, seed=cfg.train.seed, repeats=cfg.data.repeats, num_workers=0,
        num_views=cfg.distill.num_views))
    return [{(int(v), int(s)) for batch in loader.epoch(e)
             for v, s in zip(batch.views, batch.samples)} for e in range(cfg.train.epochs)]


@pytest.mark.parametrize("num_views", [None, 2])
def test_the_cache_holds_exactly_what_the_run_reads(tmp_path, num_views):
    """15 images, R = 2, 4 epochs: each epoch reads 14 (sample, repeat) pairs, so a full
    cache is 4 x 14 teacher forwards (the old rule, E x R views of all N, was 8 x 15)."""
    views = ["distill.num_views=null"] if num_views is None else [f"distill.num_views={num_views}"]
    cfg = teacher_setup(tmp_path, "train.epochs=4", "data.repeats=2", *views)
    cache_teacher(cfg)
    manifest = TeacherCache(cfg.distill.cache_dir).manifest
    cached = cached_pairs(Path(cfg.distill.cache_dir))
    reads = replay_reads(cfg, batch_size=7)  # 7 divides the 14 items of an epoch
    read = set().union(*reads)
    assert read == cached  # used / cached = 1.0
    assert manifest["forwards"] == len(cached)
    if num_views is None:
        assert manifest["num_views"] == 4 and len(cached) == 4 * 14
    else:  # two views reused over two cycles, as FKD does: fewer forwards than showings
        assert manifest["num_views"] == 2 and len(cached) < 4 * 14
    # another batch size drops the last partial step of each epoch, and reads nothing more
    reads = replay_reads(cfg, batch_size=4)
    assert set().union(*reads) <= cached
    assert all(len(r) >= 12 for r in reads)


def test_targets_travel_with_the_batch_and_are_the_teacher_on_its_view(tmp_path):
    cfg = teacher_setup(tmp_path, "train.epochs=4")  # V = 3 < 4 views: views wrap mod 3
    assert cache_teacher(cfg)
    cache = TeacherCache(cfg.distill.cache_dir)
    teacher = timm.create_model(TEACHER, num_classes=3)
    teacher.load_state_dict(torch.load(cfg.distill.teacher_checkpoint, weights_only=True))
    teacher.eval()
    index = DatasetIndex.from_folder(cfg.data.path, split="train")
    loader = build_train_loader(index, plan_params(cfg), **train_loading(
        batch_size=4, seed=cfg.train.seed, repeats=2, num_workers=1, num_views=3,
        teacher_cache=cache))
    checked = set()
    for epoch in (0, 2):  # views 0, 1, then 2, 3 mod 3 = 0
        batch = next(iter(loader.epoch(epoch)))
        with torch.no_grad():
            expected = torch.log_softmax(teacher(batch.images), dim=-1).topk(2)
        torch.testing.assert_close(batch.teacher_values, expected.values, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(batch.teacher_indices, expected.indices)
        checked |= set(batch.views.tolist())
    assert checked == {0, 1, 2}


def test_run_refuses_a_cache_of_another_seed_and_names_it(tmp_path):
    cfg = teacher_setup(tmp_path)
    cache_teacher(cfg)
    index = DatasetIndex.from_folder(cfg.data.path, split="train")
    cpu = torch.device("cpu")
    assert open_teacher_cache(cfg, index, cpu) is not None
    other = teacher_setup(tmp_path, "train.seed=1")
    with pytest.raises(TeacherCacheMismatch, match="field 'seed' is 0 in the cache, 1 in the run"):
        open_teacher_cache(other, index, cpu)
    other = teacher_setup(tmp_path, "data.scale=[0.5,1.0]")
    with pytest.raises(TeacherCacheMismatch, match="field 'plan'"):
        open_teacher_cache(other, index, cpu)
    other = teacher_setup(tmp_path, "train.epochs=2", "distill.num_views=3")
    with pytest.raises(TeacherCacheMismatch, match="field 'epochs' is 1 in the cache, 2 in"):
        open_teacher_cache(other, index, cpu)


def test_a_cache_of_another_decoder_is_refused_unless_allowed(tmp_path):
    cfg = teacher_setup(tmp_path)
    cache_teacher(cfg)
    index = DatasetIndex.from_folder(cfg.data.path, split="train")
    dali = teacher_setup(tmp_path, "data.backend=dali")
    with pytest.raises(TeacherCacheMismatch,
                       match="field 'views_backend' is 'torch' in the cache, 'dali-cpu' in the"):
        open_teacher_cache(dali, index, torch.device("cpu"))
    allowed = teacher_setup(tmp_path, "data.backend=dali", "distill.allow_backend_mismatch=true")
    with pytest.warns(UserWarning, match="field 'views_backend'"):
        assert open_teacher_cache(allowed, index, torch.device("cpu")) is not None


def test_dali_cpu_cache_is_the_teacher_on_the_students_dali_views(tmp_path):
    pytest.importorskip("nvidia.dali")
    cfg = teacher_setup(tmp_path, "data.backend=dali", "data.num_workers=1")
    assert cache_teacher(cfg)
    cache = TeacherCache(cfg.distill.cache_dir)
    assert cache.manifest["views_backend"] == "dali-cpu"
    teacher = timm.create_model(TEACHER, num_classes=3)
    teacher.load_state_dict(torch.load(cfg.distill.teacher_checkpoint, weights_only=True))
    teacher.eval()
    index = DatasetIndex.from_folder(cfg.data.path, split="train")
    loader = build_train_loader(index, plan_params(cfg), **train_loading(
        batch_size=4, seed=cfg.train.seed, repeats=2, num_workers=1, backend="dali", num_views=3,
        teacher_cache=cache))
    batches = list(loader.epoch(0))
    assert len(batches) == 3
    for batch in batches:
        with torch.no_grad():
            expected = torch.log_softmax(teacher(batch.images), dim=-1).topk(2)
        torch.testing.assert_close(batch.teacher_values, expected.values, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(batch.teacher_indices, expected.indices)
        assert batch.teacher_values.shape == (4, 2)


def test_cache_config_keys_are_checked():
    with pytest.raises(ConfigError, match="distill.cache_dir"):
        load_config(None, ["distill.type=hard", "distill.source=cache"])
    with pytest.raises(ConfigError, match="distill.topk: must be >= 1"):
        load_config(None, ["distill.topk=0"])
    with pytest.raises(ConfigError, match="distill.num_views: must be >= 1"):
        load_config(None, ["distill.num_views=0"])


def test_a_failed_pass_does_not_block_the_corrected_command(tmp_path):
    """Through the real command line: a mistyped teacher, then the corrected command."""
    cfg = teacher_setup(tmp_path)
    common = ["model.name=deit_micro_distilled_patch4_32", f"data.path={cfg.data.path}",
              "data.num_workers=0", "train.progress=false", "train.epochs=1", "data.repeats=2",
              "distill.topk=2", f"distill.cache_dir={tmp_path / 'cli'}", "distill.cache_mode=views",
              f"distill.teacher_checkpoint={cfg.distill.teacher_checkpoint}"]

    def cli(*args):
        return deit_fast("cache-teacher", *common, *args)

    wrong = cli("distill.teacher=test_efficientnetz")
    assert wrong.returncode == 2 and "unknown model 'test_efficientnetz'" in wrong.stderr
    topk = cli(f"distill.teacher={TEACHER}", "distill.topk=4")
    assert topk.returncode == 2 and "distill.topk: 4 is more than the 3 classes" in topk.stderr
    # an interrupted pass of another teacher left an incomplete manifest: it is replaced
    ShardWriter(tmp_path / "cli", header(teacher="another"))
    done = cli(f"distill.teacher={TEACHER}")
    assert done.returncode == 0, done.stderr
    assert ("14 teacher forwards (one per (view, image) pair the run shows: 1 epoch(s) with "
            "data.repeats=2, 2 views x 15 images)") in done.stdout  # 1 epoch: 2 x 7
    manifest = TeacherCache(tmp_path / "cli").manifest
    assert manifest["teacher"] == TEACHER and manifest["forwards"] == 14
