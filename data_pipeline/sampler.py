"""Repeated-augmentation sampler: a pure function of (seed, epoch, rank, world size, step).

Epoch order. R consecutive epochs form a cycle sharing one permutation of the dataset;
epoch e of the cycle takes the e-th R-th of it and lists every chosen sample R times in a
row with repeat ids 0..R-1. So an epoch holds about len(dataset) views (DeiT's epoch
length), each chosen sample appears exactly R times in it, and a cycle chooses every
sample once. (DeiT's RASampler draws a fresh random 1/R each epoch, so some images go
unseen; the cycle keeps DeiT's length and shows every image.)

Sharding. Global step s takes the items [s * B * W, (s + 1) * B * W) of the epoch order;
rank r takes every W-th of them starting at r, so the R copies of a sample land on
different ranks when W >= R. A position is therefore a global item count, which does not
depend on the world size: a run resumed on another number of ranks continues from it.

Views. The plan view of (epoch e, repeat k) is (e // R) * R + k: a sample is shown in one
epoch of each cycle, so (cycle, repeat) names each showing once, and a run of E epochs
uses `full_views(E, R)` = ceil(E / R) * R views of each image (about E x N showings, not
E x R x N). A teacher cache of fewer views V replays view mod V, reusing views as FKD does.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .keyed_random import Domain, generator


def full_views(epochs: int, repeats: int) -> int:
    """Views of a run of `epochs` epochs: one per (cycle, repeat), see the module docstring."""
    return -(-epochs // repeats) * repeats


class RepeatedAugSampler:
    """Batches of (sample, repeat) ids for one rank; see the module docstring."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        repeats: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if repeats < 1 or batch_size < 1:
            raise ValueError(f"repeats ({repeats}) and batch_size ({batch_size}) must be >= 1")
        self.num_samples, self.batch_size, self.repeats = num_samples, batch_size, repeats
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.items_per_step = batch_size * world_size
        # the shortest epoch of a cycle holds R * floor(n / R) items; drop_last at the global batch
        self.steps_per_epoch = repeats * (num_samples // repeats) // self.items_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{num_samples} samples make no full step of batch_size {batch_size} x "
                f"world_size {world_size} (repeats {repeats}); use a smaller batch"
            )
        self._cached: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """All (samples, repeats) of an epoch over all ranks, in global order."""
        # permuting ImageNet takes ~30 ms: once per epoch, not once per batch
        if self._cached is None or self._cached[0] != epoch:
            n, r = self.num_samples, self.repeats
            cycle, phase = divmod(epoch, r)
            order = generator(Domain.SAMPLER, self.seed, cycle).permutation(n)
            chosen = order[phase * n // r : (phase + 1) * n // r]
            self._cached = (epoch, (np.repeat(chosen, r), np.tile(np.arange(r), len(chosen))))
        return self._cached[1]

    def views(self, epoch: int, repeats: np.ndarray, num_views: int | None = None) -> np.ndarray:
        """The plan view of each (sample, repeat k) shown in `epoch`; mod num_views if given."""
        views = (epoch // self.repeats) * self.repeats + np.asarray(repeats, np.int64)
        return views % num_views if num_views else views

    @property
    def epoch_items(self) -> int:
        """Items of an epoch a run may read: R * floor(n / R) (then drop_last at the step)."""
        return self.repeats * (self.num_samples // self.repeats)

    def shown(self, epochs: int, num_views: int | None = None
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(views, samples) of every item epochs 0..epochs-1 show over all ranks, epoch by
        epoch; a run reads all of them but the last partial global step of each epoch."""
        for epoch in range(epochs):
            samples, repeats = self.epoch_order(epoch)
            end = self.epoch_items
            yield self.views(epoch, repeats[:end], num_views), samples[:end]

    def start_item(self, start_step: int = 0, start_item: int | None = None) -> int:
        """The global item count a resume point stands for."""
        return start_step * self.items_per_step if start_item is None else start_item

    def num_steps(self, start_step: int = 0, start_item: int | None = None) -> int:
        """Steps left in an epoch resumed from start_step (or global item start_item)."""
        left = self.epoch_items - self.start_item(start_step, start_item)
        return max(0, left // self.items_per_step)

    def batch_at(self, epoch: int, first_item: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (samples, repeats) of the global step starting at item first_item."""
        samples, repeats = self.epoch_order(epoch)
        picks = slice(first_item + self.rank, first_item + self.items_per_step, self.world_size)
        return samples[picks], repeats[picks]

    def batches(
        self, epoch: int, start_step: int = 0, start_item: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This rank's (samples, repeats) per step, from a step or from a global item count."""
        first = self.start_item(start_step, start_item)
        for step in range(self.num_steps(start_step, start_item)):
            yield self.batch_at(epoch, first + step * self.items_per_step)
