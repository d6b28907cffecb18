"""The torch fallback loader: torch.utils.data workers applying the plan with PIL/torchvision.

Workers receive whole batches of keys (`__getitems__`), so the plan is drawn vectorised
once per batch; every random value comes from the keys, so the output is identical for
any number of workers. Keys and the replacement of unreadable files are train_loader.py's.
Workers, training's and validation's, hand back with each batch the (path, reason) of the
files they skipped, or with on_bad_image=error the error, raised in the main process with
its own message. Workers ignore stop signals (workers.py). With a teacher cache, the
workers also read the teacher's top-k for each (view, requested sample) from its
memory-mapped shards, and the batch carries it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode

from .batch import TrainBatch
from .dataset import BadImageError, DatasetIndex, read_rgb, warn_skipped
from .pil_augment import augment_pil
from .plan import AugmentationPlan
from .teacher_cache import TeacherCache
from .train_loader import ListedKeys, SamplerKeys, TrainLoader, read_or_replace
from .workers import ignore_stop_signals, iterate


def batch_as_is(batch: dict) -> dict:
    """collate_fn for datasets whose `__getitems__` already returns the whole batch."""
    return batch


def _checked(out: dict) -> dict:
    """A worker's batch, or its BadImageError raised here (not wrapped in a worker traceback)."""
    if "error" in out:
        raise BadImageError(out["error"])
    return out


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 normalized, on the images' device. In place after the
    conversion, and with Python scalars: no mean/std tensor to copy to the GPU each batch."""
    images = images.float()
    for c in range(3):
        images[..., c, :, :].sub_(255 * mean[c]).div_(255 * std[c])
    return images


def erase(images: torch.Tensor, boxes: list[list[int]], noise: torch.Tensor) -> torch.Tensor:
    """Fill each sample's erasing box (top, left, height, width; height 0: none) in place;
    `noise` holds the boxes' values one after another, each in (channel, row, column) order."""
    offset = 0
    for i, (top, left, height, width) in enumerate(boxes):
        if height:
            size = 3 * height * width
            box = noise[offset : offset + size].view(3, height, width)
            images[i, :, top : top + height, left : left + width] = box
            offset += size
    return images


def finish(out: dict, device: torch.device, mean, std) -> torch.Tensor:
    """A worker's batch as float images on `device`: its uint8 images normalized and erased
    there, or, where the worker has done that already (float images), just moved."""
    images = out["images"].to(device, non_blocking=True)
    if images.is_floating_point():
        return images
    images = normalize(images, mean, std)
    if "erase_boxes" not in out:  # validation batches
        return images
    noise = out["erase_noise"].to(device, non_blocking=True)
    return erase(images, out["erase_boxes"].tolist(), noise)


class TrainViews(Dataset):
    """Map-style dataset whose items are batches of (view, sample, repeat) keys.

    Batches hold uint8 images, erasing boxes and their noise, which `finish` turns into
    float images on the training device. For a GPU the main process does that (a quarter
    of the bytes between processes and to the GPU, no float work in the workers); for the
    CPU the workers do it (`finish_in_worker`), beside the training step.
    """

    def __init__(
        self,
        index: DatasetIndex,
        plan: AugmentationPlan,
        on_bad_image: str,
        finish_in_worker: bool = False,
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        self.paths, self.labels = index.paths, index.labels
        self.plan, self.on_bad_image, self.finish_in_worker = plan, on_bad_image, finish_in_worker
        self.teacher_cache = teacher_cache

    def __len__(self) -> int:
        return len(self.paths)

    def __getitems__(self, keys: list[tuple[int, int, int, int, int]]) -> dict:
        views, requested, repeats, groups, rows = np.array(keys, np.int64).T
        seed, on_bad = self.plan.seed, self.on_bad_image
        try:
            images, samples, skipped = zip(
                *(read_or_replace(read_rgb, self.paths, seed, v, s, on_bad)
                  for v, s in zip(views.tolist(), requested.tolist()))
            )
        except BadImageError as e:
            return {"error": str(e)}
        samples = np.array(samples, np.int64)
        widths, heights = zip(*(img.size for img in images))
        d = self.plan.draw(views, samples, heights, widths)
        p = self.plan.params
        out = torch.empty(len(keys), 3, p.image_size, p.image_size, dtype=torch.uint8)
        noise = []
        for i, img in enumerate(images):
            out[i] = augment_pil(
                img, d.crop[i], d.flip[i], d.ra_op[i], d.ra_param[i], p.image_size, p.fill
            )
            _, _, h, w = d.erase[i].tolist()
            if h:
                box = self.plan.erase_noise(int(views[i]), int(samples[i]), h, w)
                noise.append(torch.from_numpy(np.ascontiguousarray(box)).view(-1))
        batch = {
            "images": out,
            "erase_boxes": torch.from_numpy(d.erase.astype(np.int64)),
            "erase_noise": torch.cat(noise) if noise else torch.empty(0),
            "labels": torch.from_numpy(self.labels[samples]),
            "samples": torch.from_numpy(samples),
            "repeats": torch.from_numpy(repeats),
            "views": torch.from_numpy(views),
            "skipped": [pair for pairs in skipped for pair in pairs],
        }
        if self.teacher_cache is not None:  # by the key's cache address
            batch["teacher_values"], batch["teacher_indices"] = self.teacher_cache.topk(
                groups, rows
            )
        if self.finish_in_worker:
            batch["images"] = finish(batch, torch.device("cpu"), p.mean, p.std)
        return batch


class _EpochKeys:
    """The batch sampler: the keys of the current pass's batches, set before each pass."""

    def __init__(self, keys: SamplerKeys | ListedKeys | None = None) -> None:
        self.batches: list[list[tuple[int, ...]]] = []
        if keys is not None:
            self.set(keys)

    def set(self, keys: SamplerKeys | ListedKeys) -> None:
        """The first pass of `keys`, as rows of (view, sample, repeat, cache group, row)."""
        self.batches = [
            list(zip(*(a.tolist() for a in keys.at(0, step)))) for step in range(keys.steps(0))
        ]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TorchTrainLoader(TrainLoader):
    """Training batches for one rank (train_loader.TrainLoader) from torch workers."""

    def _prepare(self) -> None:
        self._keys = _EpochKeys()
        views = TrainViews(
            self.index, self.plan, self.on_bad_image, self.device.type != "cuda",
            self.teacher_cache,
        )
        self._loader = DataLoader(
            views,
            batch_sampler=self._keys,
            num_workers=self.num_workers,
            collate_fn=batch_as_is,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator(),  # iterating must not draw from the global RNG
            worker_init_fn=ignore_stop_signals,
        )

    def epoch(
        self, epoch: int, start_step: int = 0, start_item: int | None = None
    ) -> Iterator[TrainBatch]:
        self._keys.set(self.keys(epoch, self.sampler.start_item(start_step, start_item)))
        p = self.plan.params
        for out in map(_checked, iterate(self._loader)):
            yield self.batch(finish(out, self.device, p.mean, p.std), out, out["skipped"])


def view_batches(index: DatasetIndex, plan: AugmentationPlan, keys: ListedKeys, num_workers: int,
                 device: torch.device, on_bad_image: str) -> Iterator[torch.Tensor]:
    """loader.view_batches from torch workers."""
    dataset = TrainViews(index, plan, on_bad_image, finish_in_worker=device.type != "cuda")
    loader = DataLoader(dataset, batch_sampler=_EpochKeys(keys),
                        num_workers=num_workers, collate_fn=batch_as_is,
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    seen: set[str] = set()
    for out in map(_checked, iterate(loader)):
        warn_skipped(out["skipped"], seen)
        yield finish(out, device, plan.params.mean, plan.params.std)


class ValImages(Dataset):
    """Resize the shorter side to size / crop_pct (bicubic), centre crop; uint8."""

    def __init__(
        self, index: DatasetIndex, image_size: int, crop_pct: float, mean, std, on_bad_image: str
    ) -> None:
        self.paths, self.labels = index.paths, index.labels
        self.size, self.resize = image_size, int(image_size / crop_pct)
        self.mean, self.std, self.on_bad_image = mean, std, on_bad_image

    def __len__(self) -> int:
        return len(self.paths)

    def __getitems__(self, indices: list[int]) -> dict:
        images, kept, skipped = [], [], []
        for i in indices:
            try:
                img = read_rgb(self.paths[i])
            except BadImageError as e:
                if self.on_bad_image == "error":
                    return {"error": str(e)}
                skipped.append((self.paths[i], str(e)))
                continue
            img = F.resize(img, self.resize, InterpolationMode.BICUBIC)
            images.append(F.pil_to_tensor(F.center_crop(img, self.size)))
            kept.append(i)
        empty = torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
        pixels = torch.stack(images) if images else empty
        return {
            "images": pixels,  # normalized on the device by `finish`
            "labels": torch.from_numpy(self.labels[kept]),
            "skipped": skipped,
        }


class TorchValLoader:
    """Each sample once over all ranks (rank r takes r, r + W, ...); bad files are dropped."""

    def __init__(
        self,
        dataset: ValImages,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        device: torch.device,
    ) -> None:
        mine = list(range(rank, len(dataset), world_size))
        self._batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
        self.device, self.on_bad_image = device, dataset.on_bad_image
        self.bad_files: set[str] = set()
        self.mean, self.std = dataset.mean, dataset.std
        self._loader = DataLoader(
            dataset,
            batch_sampler=self._batches,
            num_workers=num_workers,
            collate_fn=batch_as_is,
            pin_memory=device.type == "cuda",
            generator=torch.Generator(),  # iterating must not draw from the global RNG
            worker_init_fn=ignore_stop_signals,
        )

    @property
    def bad_images(self) -> int:
        return len(self.bad_files)

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for out in map(_checked, iterate(self._loader)):
            warn_skipped(out["skipped"], self.bad_files)
            if len(out["labels"]):
                yield (
                    finish(out, self.device, self.mean, self.std),
                    out["labels"].to(self.device, non_blocking=True),
                )
