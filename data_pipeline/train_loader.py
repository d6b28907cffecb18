"""What both training backends share; a backend adds only its decode-and-augment graph.

Keys. Each step's (views, requested samples, repeats) come from the sampler (`SamplerKeys`,
views by `RepeatedAugSampler.views`) or, for the teacher-cache pass, from a list
(`ListedKeys`); both are read by (epoch, step), as the torch batch sampler lists them and
as DALI's source asks for them. With a teacher cache, each key also carries its address
in the cache: (epoch, row) in a batches cache, (view, requested sample) in a views cache.

Unreadable files. A worker reads a key's file or, when it is unreadable and on_bad_image
is "skip", the first readable file of its replacement chain (`read_or_replace`, with
`plan.replacement_sample`), and hands back with the batch the (path, reason) of each file
it skipped, the reason as its reader raised it. The main process only records them
(`dataset.warn_skipped`): each file is counted and warned about once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

from .batch import HOST_FIELDS, TEACHER_FIELDS, TrainBatch
from .dataset import BadImageError, DatasetIndex, warn_skipped
from .plan import AugmentationPlan, replacement_sample
from .sampler import RepeatedAugSampler
from .teacher_cache import TeacherCache, batch_rows

T = TypeVar("T")
# int64 [B] each: views, requested samples, repeats, and the teacher cache's (group, row)
Keys = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]

MAX_REPLACEMENTS = 10  # this many unreadable files in a row means a broken dataset


def read_or_replace(
    read: Callable[[str], T], paths: list[str], seed: int, view: int, sample: int,
    on_bad_image: str,
) -> tuple[T, int, list[tuple[str, str]]]:
    """read(paths[sample]), or with on_bad_image "skip" that of the first readable sample of
    its replacement chain: (what read returned, sample read, (path, reason) of each
    unreadable file before it)."""
    shown, skipped = sample, []
    for attempt in range(MAX_REPLACEMENTS + 1):
        try:
            return read(paths[shown]), shown, skipped
        except BadImageError as e:
            if on_bad_image == "error":
                raise
            skipped.append((paths[shown], str(e)))
            shown = replacement_sample(seed, view, sample, attempt, len(paths))
    raise BadImageError(
        f"{MAX_REPLACEMENTS + 1} unreadable files in a row, starting at {paths[sample]}; "
        "run `deit-fast data check` on the dataset"
    )


class SamplerKeys:
    """A training run's keys per (epoch from start_epoch, step), resumed at start_item;
    cache_mode: the teacher cache's, whose addresses the keys carry."""

    def __init__(
        self, sampler: RepeatedAugSampler, start_epoch: int, start_item: int,
        num_views: int | None, cache_mode: str | None = None,
    ) -> None:
        self.sampler, self.start_epoch, self.start_item = sampler, start_epoch, start_item
        self.num_views, self.cache_mode = num_views, cache_mode

    def _first(self, epoch_idx: int) -> int:
        return self.start_item if epoch_idx == 0 else 0

    def steps(self, epoch_idx: int) -> int:
        return self.sampler.num_steps(start_item=self._first(epoch_idx))

    def at(self, epoch_idx: int, step: int) -> Keys:
        epoch = self.start_epoch + epoch_idx
        first = self._first(epoch_idx) + step * self.sampler.items_per_step
        requested, repeats = self.sampler.batch_at(epoch, first)
        views = self.sampler.views(epoch, repeats, self.num_views)
        if self.cache_mode == "batches":
            s = self.sampler
            return (views, requested, repeats, np.full_like(requested, epoch),
                    batch_rows(first, s.rank, s.batch_size))
        return views, requested, repeats, views, requested


class ListedKeys:
    """Given batches of (view, sample) rows, one pass: the teacher-cache pass's keys."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches = batches

    def steps(self, epoch_idx: int) -> int:
        return len(self.batches)

    def at(self, epoch_idx: int, step: int) -> Keys:
        views, samples = np.asarray(self.batches[step], np.int64).T
        return views, samples, np.zeros_like(samples), views, samples


class TrainLoader:
    """One rank's training batches. A backend subclass sets up its workers in `_prepare` and
    yields the batches from `epoch(e, start_step, start_item)` (start_item: a global item
    count, which works across a change of world size)."""

    def __init__(
        self,
        index: DatasetIndex,
        plan: AugmentationPlan,
        sampler: RepeatedAugSampler,
        num_workers: int,
        device: torch.device,
        on_bad_image: str,
        num_views: int | None,
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        self.index, self.plan, self.sampler, self.device = index, plan, sampler, device
        self.num_workers, self.on_bad_image, self.num_views = num_workers, on_bad_image, num_views
        self.teacher_cache = teacher_cache
        self.bad_files: set[str] = set()  # the distinct unreadable files skipped so far
        self._prepare()

    @property
    def bad_images(self) -> int:
        return len(self.bad_files)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def items_per_step(self) -> int:
        return self.sampler.items_per_step

    def keys(self, epoch: int, first_item: int) -> SamplerKeys:
        """The keys of epoch `epoch` from global item first_item on, then of those after it."""
        mode = self.teacher_cache.mode if self.teacher_cache else None
        return SamplerKeys(self.sampler, epoch, first_item, self.num_views, mode)

    def batch(self, images: torch.Tensor, out: dict, skipped: list[tuple[str, str]]) -> TrainBatch:
        """A worker's batch (host tensors by field name) as a TrainBatch, the files its
        workers skipped ((path, reason) pairs) recorded."""
        warn_skipped(skipped, self.bad_files)
        fields = ("labels", *TEACHER_FIELDS) if self.teacher_cache else ("labels",)
        return TrainBatch(
            images=images, **{k: out[k].to(self.device, non_blocking=True) for k in fields},
            **{k: out[k] for k in HOST_FIELDS},
        )
