"""The one place a loader backend is chosen: `build_train_loader`, `view_batches`,
`build_val_loader`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from .dataset import DatasetIndex
from .plan import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    AugmentationPlan,
    PlanParams,
)
from .sampler import RepeatedAugSampler
from .train_loader import ListedKeys

if TYPE_CHECKING:  # the backends load lazily: DALI is optional
    from .dali import DaliValLoader
    from .teacher_cache import TeacherCache
    from .torch_loader import TorchValLoader
    from .train_loader import TrainLoader

BACKENDS = ("torch", "dali")
BAD_IMAGE_POLICIES = ("skip", "error")


def _check_choices(backend: str, on_bad_image: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"data backend {backend!r}: accepted {BACKENDS}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image {on_bad_image!r}: accepted {BAD_IMAGE_POLICIES}")


def build_train_loader(
    index: DatasetIndex,
    params: PlanParams,
    *,
    batch_size: int,
    seed: int,
    repeats: int,
    num_workers: int,
    backend: str,
    on_bad_image: str,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    num_views: int | None = None,
    teacher_cache: TeacherCache | None = None,
) -> TrainLoader:
    """A loader with `steps_per_epoch`, `epoch(e, start_step=0, start_item=None)`, `bad_files`.
    The run's values (batch, seed, repeats, workers, backend, bad-image policy) have no
    defaults here: the trainer's config declares them.

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
            index, plan, sampler, num_workers, device, on_bad_image, num_views, teacher_cache
        )
    from .torch_loader import TorchTrainLoader

    return TorchTrainLoader(
        index, plan, sampler, num_workers, device, on_bad_image, num_views, teacher_cache
    )


def view_batches(
    index: DatasetIndex,
    plan: AugmentationPlan,
    batches: list[np.ndarray],
    *,
    backend: str,
    num_workers: int,
    on_bad_image: str,
    device: torch.device | None = None,
) -> Iterator[torch.Tensor]:
    """The views of listed batches of (view, sample) rows, batch by batch, as training renders
    them, on the device (the teacher-cache pass); each replaced unreadable file is warned
    about once."""
    _check_choices(backend, on_bad_image)
    device = device or torch.device("cpu")
    if backend == "dali":
        from .dali import view_batches as render
    else:
        from .torch_loader import view_batches as render
    return render(index, plan, ListedKeys(batches), num_workers, device, on_bad_image)


def build_val_loader(
    index: DatasetIndex,
    *,
    image_size: int,
    crop_pct: float,
    batch_size: int,
    num_workers: int,
    backend: str,
    on_bad_image: str,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
) -> TorchValLoader | DaliValLoader:
    """Iterable of (images, labels) on the device; each sample once over all ranks; the
    run's values have no defaults here (see build_train_loader)."""
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
