"""The one place a loader backend is chosen: `build_train_loader` / `build_val_loader`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .dataset import DatasetIndex
from .plan import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    AugmentationPlan,
    PlanParams,
)
from .sampler import RepeatedAugSampler

if TYPE_CHECKING:  # the backends load lazily: DALI is optional
    from .dali import DaliTrainLoader, DaliValLoader
    from .teacher_cache import TeacherCache
    from .torch_loader import TorchTrainLoader, TorchValLoader

BACKENDS = ("torch", "dali")
BAD_IMAGE_POLICIES = ("skip", "error")


@dataclass
class TrainBatch:
    """One rank's batch on the device; views[i] is the plan view of samples[i]. With a
    teacher cache, the teacher's top-k for each (view, requested sample) rides along."""

    images: torch.Tensor  # float32 [B, 3, S, S], normalized and erased
    labels: torch.Tensor  # int64 [B]
    samples: torch.Tensor  # int64 [B] dataset index actually shown (a replacement if unreadable)
    repeats: torch.Tensor  # int64 [B] repeat id k
    views: torch.Tensor  # int64 [B] the sampler's view rule (mod num_views with a cache)
    teacher_values: torch.Tensor | None = None  # float32 [B, k] top-k log-probabilities
    teacher_indices: torch.Tensor | None = None  # int64 [B, k] their classes


def _check_choices(backend: str, on_bad_image: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"data backend {backend!r}: accepted {BACKENDS}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image {on_bad_image!r}: accepted {BAD_IMAGE_POLICIES}")


def build_train_loader(
    index: DatasetIndex,
    params: PlanParams,
    batch_size: int,
    seed: int = 0,
    repeats: int = 3,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    backend: str = "torch",
    device: torch.device | None = None,
    on_bad_image: str = "skip",
    num_views: int | None = None,
    teacher_cache: TeacherCache | None = None,
) -> TorchTrainLoader | DaliTrainLoader:
    """A loader with `steps_per_epoch`, `epoch(e, start_step=0, start_item=None)`, `bad_files`.

    num_views: views wrap mod num_views (RepeatedAugSampler.views), to replay a cache of V.
    teacher_cache: its workers attach the teacher's top-k to every batch.
    start_item: resume from a global item count (step * batch_size * world_size of the run
    that saved it), which works across a change of world size.
    """
    _check_choices(backend, on_bad_image)
    device = device or torch.device("cpu")
    plan = AugmentationPlan(params, seed)
    sampler = RepeatedAugSampler(len(index), batch_size, repeats, seed, rank, world_size)
    if backend == "dali":
        from .dali import DaliTrainLoader

        return DaliTrainLoader(
            index, plan, sampler, num_workers, device, on_bad_image, num_views, TrainBatch,
            teacher_cache,
        )
    from .torch_loader import TorchTrainLoader

    return TorchTrainLoader(
        index, plan, sampler, num_workers, device, on_bad_image, num_views, TrainBatch,
        teacher_cache,
    )


def build_val_loader(
    index: DatasetIndex,
    image_size: int = 224,
    crop_pct: float = 0.875,
    batch_size: int = 256,
    num_workers: int = 2,
    backend: str = "torch",
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    on_bad_image: str = "skip",
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
) -> TorchValLoader | DaliValLoader:
    """Iterable of (images, labels) on the device; each sample once over all ranks."""
    _check_choices(backend, on_bad_image)
    device = device or torch.device("cpu")
    if backend == "dali":
        from .dali import DaliValLoader

        return DaliValLoader(
            index,
            image_size,
            crop_pct,
            batch_size,
            rank,
            world_size,
            num_workers,
            device,
            on_bad_image,
            mean,
            std,
        )
    from .torch_loader import TorchValLoader, ValImages

    images = ValImages(index, image_size, crop_pct, mean, std, on_bad_image)
    return TorchValLoader(images, batch_size, rank, world_size, num_workers, device)
