"""`deit-fast cache-teacher`: run the teacher once on what the planned run will show it.

distill.cache_mode=batches (the default) replays the run's training batches as its
loaders form them (the sampler's batch of every rank at every step, each image rendered by
the plan) and mixes each as the training step will (the Mixup/CutMix draw of its (epoch,
step, rank)); the cache then holds the teacher's top-k on the very images the student
trains on, which is what the online teacher gives the loss. The batch layout is part of the
cache: run the pass with the run's world size (torchrun with the same --nproc_per_node, or
one process for a one-process run). distill.cache_mode=views computes the teacher on the
unmixed (view, sample) pairs the run reads (view mod V), one forward per showing for a full
cache; training mixes them afterwards.

Each image is rendered by the run's own backend and plan (torch: the torch loader's workers;
dali: the DALI graph, on the GPU or its CPU graph) and the teacher runs under the run's
precision. Ranks (RANK/WORLD_SIZE, as torchrun sets them) take every W-th shard; a rerun
skips finished shards, and a complete cache is left as it is.
"""

from __future__ import annotations

import collections
import itertools
import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from deit_fast.config import Config, ConfigError
from deit_fast.data_pipeline.dataset import DatasetIndex
from deit_fast.data_pipeline.loader import view_batches
from deit_fast.data_pipeline.plan import AugmentationPlan
from deit_fast.data_pipeline.sampler import RepeatedAugSampler
from deit_fast.data_pipeline.teacher_cache import (
    NOT_SHOWN,
    ShardSpec,
    ShardWriter,
    manifest_header,
    row_bytes,
    sha256_file,
)
from deit_fast.data_pipeline.train_loader import SamplerKeys
from deit_fast.ops import autocast
from deit_fast.resolve import (
    build_mixup,
    cache_geometry,
    cache_identity,
    data_root,
    image_size,
    loading,
    num_views,
    plan_params,
    resolve_device,
    views_backend,
)
from deit_fast.teacher import load_teacher


@dataclass
class TeacherBatch:
    """One teacher forward: the (view, sample) rows to render, the rows of `shard` its
    outputs fill, and its Mixup key (epoch, step, rank) in a batches cache."""

    shard: ShardSpec
    keys: np.ndarray  # int64 [n, 2]
    rows: np.ndarray  # int64 [n], offsets in the shard
    mix: tuple[int, int, int] | None = None


def shown_pairs(cfg: Config, num_samples: int) -> np.ndarray:
    """bool [V, N]: which (view, sample) pairs the configured run shows (view mod V)."""
    sampler = RepeatedAugSampler(num_samples, 1, cfg.data.repeats, cfg.train.seed)
    shown = np.zeros((num_views(cfg), num_samples), bool)
    for views, samples in sampler.shown(cfg.train.epochs, num_views(cfg)):
        shown[views, samples] = True
    return shown


def view_work(shards: list[ShardSpec], shown: np.ndarray, batch: int) -> list[TeacherBatch]:
    """A views cache's forwards: the shown rows of each shard, `batch` at a time."""
    work = []
    for s in shards:
        rows = np.flatnonzero(shown[s.group, s.first_row:s.first_row + s.count])
        for part in np.split(rows, range(batch, len(rows), batch)):
            if len(part):
                keys = np.stack([np.full(len(part), s.group), s.first_row + part], axis=1)
                work.append(TeacherBatch(s, keys, part))
    return work


def batch_work(cfg: Config, shards: list[ShardSpec], num_samples: int,
               world_size: int) -> list[TeacherBatch]:
    """A batches cache's forwards: every rank's batch of every global step of each shard,
    as the run's sampler forms it and its loader addresses it (SamplerKeys), with the Mixup
    key the training step draws it with."""
    d = cfg.data
    ranks = [SamplerKeys(RepeatedAugSampler(num_samples, d.batch_size, d.repeats, cfg.train.seed,
                                            r, world_size), 0, 0, None, "batches")
             for r in range(world_size)]
    step_items = ranks[0].sampler.items_per_step  # a shard holds whole global steps
    work = []
    for s in shards:
        for step in range(s.first_row // step_items, (s.first_row + s.count) // step_items):
            for rank, keys in enumerate(ranks):
                views, samples, _, _, rows = keys.at(s.group, step)
                work.append(TeacherBatch(s, np.stack([views, samples], axis=1),
                                         rows - s.first_row, (s.group, step, rank)))
    return work


def _describe(cfg: Config, header: dict, world_size: int, device: torch.device) -> str:
    """The pass's header line: the forwards, what they are, and the shards' size."""
    d, n = cfg.data, header["num_samples"]
    size = header["groups"] * header["rows"] * row_bytes(header["topk"], header["num_classes"])
    if header["cache_mode"] == "batches":
        steps = header["rows"] // (d.batch_size * world_size)
        what = (f"{header['groups']} epochs x {steps} steps x {world_size} rank(s) x "
                f"{d.batch_size} mixed images, the batches the run trains on")
    else:
        what = (f"one per (view, image) pair the run shows: {cfg.train.epochs} epoch(s) with "
                f"data.repeats={d.repeats}, {header['groups']} views x {n:,} images")
    return (f"cache-teacher: {header['forwards']:,} teacher forwards ({what}); shards of "
            f"{size / 2**20:,.1f} MiB ({size:,} bytes) in {cfg.distill.cache_dir}; views by "
            f"{views_backend(cfg, device)}")


def cache_teacher(cfg: Config, rank: int | None = None, world_size: int | None = None) -> bool:
    """Write this rank's shards of the cache at distill.cache_dir; whether the cache is
    complete (with several ranks, once the last of them is done)."""
    d = cfg.distill
    for key, value in (("distill.teacher", d.teacher), ("distill.cache_dir", d.cache_dir),
                       ("distill.teacher_checkpoint", d.teacher_checkpoint)):
        if not value:
            raise ConfigError(f"{key}: cache-teacher needs it (e.g. {key}=...)")
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    index = DatasetIndex.from_folder(data_root(cfg), split="train")
    num_classes = len(index.classes)
    if d.topk > num_classes:
        raise ConfigError(f"distill.topk: {d.topk} is more than the {num_classes} classes")
    # before any file is written
    teacher = load_teacher(d.teacher, d.teacher_checkpoint, num_classes, device, image_size(cfg))
    groups, rows, shard_rows = cache_geometry(cfg, len(index), world_size)
    shown = shown_pairs(cfg, len(index)) if d.cache_mode == "views" else None
    header = manifest_header(
        cache_identity(cfg, index, sha256_file(d.teacher_checkpoint), device, world_size),
        groups=groups, rows=rows, shard_rows=shard_rows,
        forwards=int(shown.sum()) if shown is not None else groups * rows)
    writer = ShardWriter(d.cache_dir, header)
    shards = writer.layout.shards()
    todo = [s for s in shards[rank::world_size] if not writer.is_complete(s)]
    if rank == 0:
        print(_describe(cfg, header, world_size, device), flush=True)
        if len(todo) < len(shards[rank::world_size]):
            print(f"cache-teacher: {len(shards) - len(todo)} of {len(shards)} shards are already "
                  "written" + ("; nothing left to compute" if not todo else ", resuming"),
                  flush=True)
    total = sum(int(shown[s.group, s.first_row:s.first_row + s.count].sum())
                if shown is not None else s.count for s in todo)
    bar = tqdm(total=total, unit="image", desc=f"cache-teacher r{rank}",
               disable=not cfg.train.progress, dynamic_ncols=True)
    pass_ = CachePass(cfg, teacher, index, writer, device)
    for _, group in itertools.groupby(todo, key=lambda s: s.group):  # a group's keys at a time
        shards = list(group)
        pass_.run(view_work(shards, shown, cfg.data.eval_batch_size) if shown is not None
                  else batch_work(cfg, shards, len(index), world_size), shards, bar)
    bar.close()
    return writer.finalize()


class CachePass:
    """Renders, mixes, runs the teacher on and stores batches of work, shard by shard."""

    def __init__(self, cfg: Config, teacher: torch.nn.Module, index: DatasetIndex,
                 writer: ShardWriter, device: torch.device) -> None:
        self.cfg, self.teacher, self.index, self.writer = cfg, teacher, index, writer
        self.device, self.k = device, cfg.distill.topk
        self.plan = AugmentationPlan(plan_params(cfg), cfg.train.seed)
        self.mixup = build_mixup(cfg.data, len(index.classes), cfg.train.seed)
        self.autocast = lambda: autocast(device, cfg.train.precision)

    def run(self, work: list[TeacherBatch], shards: list[ShardSpec], bar: tqdm) -> None:
        pending = collections.Counter(b.shard.name for b in work)
        for s in shards:  # nothing to compute (rows of a views cache the run never reads)
            if not pending[s.name]:
                self.writer.write(s, *self._empty(s))
        rendered = iter(())
        if work:  # an unreadable file's replacement is rendered, as the run trains on it
            rendered = view_batches(self.index, self.plan, [b.keys for b in work],
                                    **loading(self.cfg, self.device))
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        with torch.inference_mode():
            for b, images in zip(work, rendered):
                if b.mix is not None:
                    params = self.mixup.device_params(b.mix, images)
                    images = self.mixup.mix_images(images, *params)
                with self.autocast():
                    logits = self.teacher(images)
                top = torch.log_softmax(logits.float(), dim=-1).topk(self.k, dim=-1)
                values, indices = out.setdefault(b.shard.name, self._empty(b.shard))
                values[b.rows] = top.values.cpu().numpy()
                indices[b.rows] = top.indices.cpu().numpy()
                bar.update(len(b.rows))
                pending[b.shard.name] -= 1
                if not pending[b.shard.name]:
                    self.writer.write(b.shard, *out.pop(b.shard.name))

    def _empty(self, shard: ShardSpec) -> tuple[np.ndarray, np.ndarray]:
        return (np.zeros((shard.count, self.k), np.float32),
                np.full((shard.count, self.k), NOT_SHOWN, np.int64))
