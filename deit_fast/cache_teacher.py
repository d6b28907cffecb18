"""`deit-fast cache-teacher`: run the teacher once over V views of the training set.

Each view is built by the student's own pipeline and plan (the torch loader's TrainViews
with explicit (view, sample) keys, no mixup), so the cached top-k is what the teacher
would say about exactly the image the student sees at that view. Ranks (RANK/WORLD_SIZE,
as torchrun sets them) take every W-th shard; a rerun skips finished shards.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data_pipeline.dataset import DatasetIndex
from data_pipeline.plan import AugmentationPlan
from data_pipeline.teacher_cache import ShardWriter, manifest_header, sha256_file
from data_pipeline.torch_loader import TrainViews, batch_as_is, finish
from deit_fast.config import Config, ConfigError
from deit_fast.run import data_root, plan_params, resolve_device
from deit_fast.teacher import load_teacher


def num_views(cfg: Config) -> int:
    """V: distill.num_views, or one fresh view per (epoch, repeat) of the run."""
    return cfg.distill.num_views or cfg.train.epochs * cfg.data.repeats


def cache_header(cfg: Config, index: DatasetIndex, teacher_sha256: str) -> dict[str, Any]:
    """The manifest identity of the cache this config asks for."""
    return manifest_header(
        dataset_fingerprint=index.fingerprint, num_samples=len(index), seed=cfg.train.seed,
        plan=dataclasses.asdict(plan_params(cfg)), num_classes=len(index.classes),
        teacher=cfg.distill.teacher or "", teacher_checkpoint_sha256=teacher_sha256,
        num_views=num_views(cfg), topk=cfg.distill.topk, shard_size=cfg.distill.shard_size)


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
    writer = ShardWriter(d.cache_dir, cache_header(cfg, index, sha256_file(d.teacher_checkpoint)))
    teacher = load_teacher(d.teacher, d.teacher_checkpoint, num_classes, device)
    dataset = TrainViews(index, AugmentationPlan(plan_params(cfg), cfg.train.seed),
                         cfg.data.on_bad_image, finish_in_worker=device.type != "cuda")
    todo = [s for s in writer.layout.shards()[rank::world_size] if not writer.is_complete(s)]
    step = cfg.data.eval_batch_size
    batches = [[(s.view, i, 0) for i in range(first, min(first + step, s.first_sample + s.count))]
               for s in todo for first in range(s.first_sample, s.first_sample + s.count, step)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.data.num_workers,
                        collate_fn=batch_as_is, pin_memory=device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(total=sum(s.count for s in todo), unit="view", desc=f"cache-teacher r{rank}",
               disable=not cfg.train.progress, dynamic_ncols=True)
    batch_iter = iter(loader)
    with torch.inference_mode():
        for shard in todo:
            values, indices = [], []
            done = 0
            while done < shard.count:
                out = next(batch_iter)
                for message in out["bad"]:  # the replacement's view is cached, as trained on
                    warnings.warn(f"skipped unreadable image: {message}", stacklevel=2)
                images = finish(out, device, dataset.plan.params.mean, dataset.plan.params.std)
                with autocast:
                    logits = teacher(images)
                top = torch.log_softmax(logits.float(), dim=-1).topk(d.topk, dim=-1)
                values.append(top.values.cpu().numpy())
                indices.append(top.indices.cpu().numpy())
                done += len(out["images"])
                bar.update(len(out["images"]))
            writer.write(shard, np.concatenate(values), np.concatenate(indices))
    bar.close()
    writer.finalize()
    return Path(d.cache_dir)
