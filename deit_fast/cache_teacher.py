"""`deit-fast cache-teacher`: run the teacher once on every view the planned run will show.

The sampler is a pure function, so the pass replays it over train.epochs and computes the
teacher only on the (view, sample) pairs the run will read (view mod V): one forward per
showing for a full cache, as an online teacher would pay, and fewer with a smaller V,
whose views are reused. Each view is rendered by the run's own backend and plan (torch:
the torch loader's workers; dali: the DALI graph, on the GPU or its CPU graph), with no
mixup, so the cached top-k is what the teacher says about exactly the image the student
sees. Ranks (RANK/WORLD_SIZE, as torchrun sets them) take every W-th shard; a rerun skips
finished shards.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from deit_fast.config import Config, ConfigError
from deit_fast.data_pipeline.dataset import DatasetIndex
from deit_fast.data_pipeline.loader import view_batches
from deit_fast.data_pipeline.plan import AugmentationPlan
from deit_fast.data_pipeline.sampler import RepeatedAugSampler
from deit_fast.data_pipeline.teacher_cache import NOT_SHOWN, ShardWriter, cache_bytes, sha256_file
from deit_fast.recipe import (
    cache_header,
    data_root,
    num_views,
    plan_params,
    resolve_device,
    views_backend,
)
from deit_fast.teacher import load_teacher


def shown_pairs(cfg: Config, num_samples: int) -> np.ndarray:
    """bool [V, N]: which (view, sample) pairs the configured run shows (view mod V)."""
    sampler = RepeatedAugSampler(num_samples, 1, cfg.data.repeats, cfg.train.seed)
    shown = np.zeros((num_views(cfg), num_samples), bool)
    for views, samples in sampler.shown(cfg.train.epochs, num_views(cfg)):
        shown[views, samples] = True
    return shown


def cache_teacher(cfg: Config, rank: int | None = None, world_size: int | None = None) -> Path:
    """Write this rank's shards of the cache at distill.cache_dir; returns the folder."""
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
    teacher = load_teacher(d.teacher, d.teacher_checkpoint, num_classes, device)  # before any file
    shown = shown_pairs(cfg, len(index))
    header = cache_header(cfg, index, sha256_file(d.teacher_checkpoint), device,
                          forwards=int(shown.sum()))
    if rank == 0:
        size = cache_bytes(len(index), shown.shape[0], d.topk, num_classes)
        print(f"cache-teacher: {header['forwards']:,} teacher forwards ({shown.shape[0]} views "
              f"of {len(index):,} images, as {cfg.train.epochs} epochs with data.repeats="
              f"{cfg.data.repeats} show them), {size / 2**20:,.1f} MiB of shards in "
              f"{d.cache_dir}, views by {views_backend(cfg, device)}", flush=True)
    writer = ShardWriter(d.cache_dir, header)
    plan = AugmentationPlan(plan_params(cfg), cfg.train.seed)
    todo = [s for s in writer.layout.shards()[rank::world_size] if not writer.is_complete(s)]
    rows = {s.name: np.flatnonzero(shown[s.view, s.first_sample:s.first_sample + s.count])
            for s in todo}  # the shard's rows the run reads
    step = cfg.data.eval_batch_size
    batches = []  # (view, sample) rows, a shard at a time
    for s in todo:
        r = rows[s.name]
        batches += [np.stack([np.full(len(part), s.view), s.first_sample + part], axis=1)
                    for part in np.split(r, range(step, len(r), step)) if len(part)]
    rendered = iter(())
    if batches:  # an unreadable file's replacement is cached, as the run trains on it
        rendered = view_batches(index, plan, batches, cfg.data.backend, cfg.data.num_workers,
                                device, cfg.data.on_bad_image)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(total=sum(len(r) for r in rows.values()), unit="view",
               desc=f"cache-teacher r{rank}", disable=not cfg.train.progress, dynamic_ncols=True)
    with torch.inference_mode():
        for shard in todo:
            values = np.zeros((shard.count, d.topk), np.float32)
            indices = np.full((shard.count, d.topk), NOT_SHOWN, np.int64)
            done = 0
            while done < len(rows[shard.name]):
                images = next(rendered)
                with autocast:
                    logits = teacher(images)
                top = torch.log_softmax(logits.float(), dim=-1).topk(d.topk, dim=-1)
                mine = rows[shard.name][done:done + len(images)]
                values[mine], indices[mine] = top.values.cpu().numpy(), top.indices.cpu().numpy()
                done += len(images)
                bar.update(len(images))
            writer.write(shard, values, indices)
    bar.close()
    writer.finalize()
    return Path(d.cache_dir)
