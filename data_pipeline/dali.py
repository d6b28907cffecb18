"""DALI pipelines: the plan applied by one graph that runs on the GPU or, for tests, the CPU.

Train: parallel `external_source` workers (dali_source.py) read file bytes, parse the
header for the image size, draw the plan for the batch (vectorised) and feed it -> ROI decode
(`decoders.image_slice`, device "mixed" on a GPU) -> cubic resize -> flip -> RandAugment
(`auto_aug.core.select` on the plan's op indices) -> normalize -> erase. DALI's erase
fills constants only, so the plan's noise is fed as a box and padded into place with
`slice`. Val: decode -> resize (sizes from the header, as torchvision computes them) ->
centre crop -> normalize.

Unreadable files are found by the header parse in the workers, replaced (train) or dropped
(val) and reported with the batch as dali_source.py describes; with on_bad_image=error the
main process raises the worker's error, in one line, when its batch arrives. A file whose
header parses but whose body DALI cannot decode fails its batch: DALI raises the error when
that batch is asked for, so the files the source handed it for that batch are decoded with
PIL to name the file; the pipeline is then rebuilt at that step with the file marked bad,
so a run loses nothing but that image. The Python workers start with stop signals ignored
(workers.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug.core import select
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from .batch import TrainBatch
from .dali_augment import rand_augment_ops
from .dali_source import TrainSource, ValSource, decode_reports, reported_skips
from .dataset import BadImageError, DatasetIndex, read_rgb, warn_skipped
from .plan import AugmentationPlan
from .train_loader import ListedKeys, TrainLoader
from .workers import workers_ignore_stop_signals


def _mark_undecodable(
    paths: list[str], known_bad: set[str], on_bad_image: str, error: Exception
) -> None:
    """After DALI failed on a batch of these files: find the file with PIL and mark it, or
    re-raise."""
    bad = []
    for path in paths:
        try:
            read_rgb(path)
        except BadImageError:
            bad.append(path)
    if not bad:
        raise error
    if on_bad_image == "error":
        raise BadImageError(f"cannot decode image {bad[0]}: DALI's decoder failed on it") from error
    known_bad.update(bad)


# ---------------------------------------------------------------- graphs


def _normalize(images, mean, std):
    """uint8 HWC -> float CHW, (x / 255 - mean) / std."""
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[255 * m for m in mean],
        std=[255 * s for s in std],
    )


def _decoder_device(on_gpu: bool) -> str:
    return "mixed" if on_gpu else "cpu"


def train_inputs(source: TrainSource) -> dict:
    """The source's outputs as graph nodes, by name."""
    nodes = fn.external_source(
        source,
        num_outputs=len(source.outputs),
        batch=True,
        batch_info=True,
        parallel=True,
        layout=["CHW" if n == "noise" else None for n in source.outputs],
    )
    return dict(zip(source.outputs, nodes))


def decode_crop(x: dict, on_gpu: bool):
    """The plan's crop window, decoded alone (ROI decode), uint8 HWC."""
    return fn.decoders.image_slice(
        x["encoded"],
        x["crop_anchor"],
        x["crop_shape"],
        device=_decoder_device(on_gpu),
        output_type=types.RGB,
        adjust_orientation=False,
    )


def resize_square(images, size: int):
    return fn.resize(images, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)


def rand_augment(images, x: dict, num_layers: int, size: int, fill):
    ops = rand_augment_ops(size, fill)
    for layer in range(num_layers):
        images = select(ops, x["ra_op"][layer], images, param=x["ra_param"][layer])
    return images


def erase(images, x: dict, size: int, on_gpu: bool):
    """Random erasing with the plan's noise, on the normalized CHW images that have a box."""
    if x["erased"]:  # a conditional: only the erased quarter of the batch pays for the box
        box = x["erase_box"]
        images = fn.erase(images, anchor=box[0:2], shape=box[2:4], axis_names="HW", fill_value=0.0)
        noise = fn.slice(
            x["noise"],
            -box[0:2],
            types.Constant(np.array([size, size], np.float32)),
            axis_names="HW",
            out_of_bounds_policy="pad",
            normalized_anchor=False,
            normalized_shape=False,
        )
        images = images + (noise.gpu() if on_gpu else noise)
    return images


@pipeline_def(enable_conditionals=True)
def train_graph(source: TrainSource, size: int, num_layers: int, fill, mean, std, on_gpu: bool):
    x = train_inputs(source)
    images = resize_square(decode_crop(x, on_gpu), size)
    images = fn.flip(images, horizontal=x["flip"])
    images = rand_augment(images, x, num_layers, size, fill)
    images = erase(_normalize(images, mean, std), x, size, on_gpu)
    return (images, *(x[name] for name in source.passed_through))


def _train_pipeline(source: TrainSource, plan: AugmentationPlan, device: torch.device,
                    batch_size: int, num_workers: int, **iterator_args) -> DALIGenericIterator:
    p = plan.params
    ra = p.rand_augment_config
    pipe = train_graph(
        source,
        p.image_size,
        ra.num_layers if ra else 0,
        p.fill,
        p.mean,
        p.std,
        **_pipeline_args(device, batch_size, num_workers),
    )
    with workers_ignore_stop_signals():
        pipe.build()
    return DALIGenericIterator([pipe], ["images", *source.passed_through], **iterator_args)


def view_batches(index: DatasetIndex, plan: AugmentationPlan, keys: ListedKeys, num_workers: int,
                 device: torch.device, on_bad_image: str) -> Iterator[torch.Tensor]:
    """loader.view_batches from the DALI graph."""
    source = TrainSource(index, plan, keys, on_bad_image, frozenset())
    largest = max(len(b) for b in keys.batches)
    seen: set[str] = set()
    for (out,) in _train_pipeline(source, plan, device, largest, num_workers):
        warn_skipped(reported_skips(decode_reports(out["report"])), seen)
        yield out["images"].to(device, non_blocking=True)


@pipeline_def
def val_graph(source: ValSource, size: int, mean, std, on_gpu: bool):
    encoded, resize, crop, labels, report = fn.external_source(
        source, num_outputs=5, batch=True, batch_info=True, parallel=True
    )
    images = fn.decoders.image(
        encoded, device=_decoder_device(on_gpu), output_type=types.RGB, adjust_orientation=False
    )
    images = fn.resize(
        images,
        resize_y=resize[0],
        resize_x=resize[1],
        interp_type=types.INTERP_CUBIC,
        antialias=True,
    )
    images = fn.slice(
        images,
        crop,
        types.Constant(np.array([size, size], np.float32)),
        axis_names="HW",
        normalized_anchor=False,
        normalized_shape=False,
    )
    images = _normalize(images, mean, std)
    return images, labels, report


# ---------------------------------------------------------------- loaders (main process)


def _pipeline_args(device: torch.device, batch_size: int, num_workers: int) -> dict:
    device_id = None
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    # DALI's forked workers cannot live with an initialised CUDA context in the parent
    forked = not (torch.cuda.is_available() and torch.cuda.is_initialized())
    # the Python source (read, header, plan) is most of the CPU work when the GPU decodes,
    # about a tenth when the CPU does; DALI's own threads take the rest
    python_workers = num_workers if device_id is not None else num_workers // 2
    return {
        "batch_size": batch_size,
        "num_threads": max(1, num_workers),
        "device_id": device_id,
        "on_gpu": device_id is not None,
        "py_num_workers": max(1, python_workers),
        "py_start_method": "fork" if forked else "spawn",
        # raises a batch's decode error when that batch is asked for, not before (the
        # default executor now; the older one raised it while earlier batches were pending)
        "exec_dynamic": True,
    }


class DaliTrainLoader(TrainLoader):
    """Training batches for one rank (train_loader.TrainLoader) from the DALI graph."""

    def _prepare(self) -> None:
        self._known_bad: set[str] = set()  # files DALI failed to decode though their header parsed
        self._iterator: DALIGenericIterator | None = None
        self._next_epoch: int | None = None  # the epoch the running pipeline will produce next

    def _source(self, epoch: int, first_item: int) -> TrainSource:
        return TrainSource(
            self.index,
            self.plan,
            self.keys(epoch, first_item),
            self.on_bad_image,
            frozenset(self._known_bad),
            self.teacher_cache,
        )

    def _start(self, epoch: int, first_item: int) -> None:
        self._iterator = _train_pipeline(
            self._source(epoch, first_item),
            self.plan,
            self.device,
            self.sampler.batch_size,
            self.num_workers,
            auto_reset=True,
        )

    def epoch(
        self, epoch: int, start_step: int = 0, start_item: int | None = None
    ) -> Iterator[TrainBatch]:
        item = self.sampler.start_item(start_step, start_item)
        restart = self._iterator is None or item != 0 or self._next_epoch != epoch
        self._next_epoch = None
        while True:
            try:
                if restart:  # the iterator reads its first batch as it starts
                    restart = False
                    self._start(epoch, item)
                out = next(self._iterator)[0]
            except StopIteration:
                break
            except Exception as error:  # DALI's error for the batch at `item`
                paths = self._source(epoch, item).handed_paths(0)
                _mark_undecodable(paths, self._known_bad, self.on_bad_image, error)
                restart = True  # the same batches again, the bad files now replaced
                continue
            skipped = reported_skips(decode_reports(out["report"]))
            if self.teacher_cache is not None:  # host tensors from the source: no device sync
                self.teacher_cache.check_shown(out["teacher_indices"], lambda item=item: (
                    f"epoch {epoch}, step {item // self.sampler.items_per_step}"))
            item += self.sampler.items_per_step
            yield self.batch(out["images"].to(self.device, non_blocking=True), out, skipped)
        self._next_epoch = epoch + 1


class DaliValLoader:
    """Each sample once over all ranks (rank r takes r, r + W, ...); bad files are dropped."""

    def __init__(
        self,
        index: DatasetIndex,
        image_size: int,
        crop_pct: float,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        device: torch.device,
        on_bad_image: str,
        mean,
        std,
    ) -> None:
        self.index, self.device, self.on_bad_image = index, device, on_bad_image
        self.bad_files: set[str] = set()
        self._mine = list(range(rank, len(index), world_size))
        self._args = (image_size, crop_pct, batch_size, mean, std, num_workers)
        self._known_bad: set[str] = set()

    @property
    def bad_images(self) -> int:
        return len(self.bad_files)

    def __len__(self) -> int:
        return -(-len(self._mine) // self._args[2])

    def _source(self, first_step: int) -> ValSource:
        image_size, crop_pct, batch_size, _, _, _ = self._args
        return ValSource(
            self.index,
            self._mine[first_step * batch_size :],
            batch_size,
            image_size,
            crop_pct,
            self.on_bad_image,
            frozenset(self._known_bad),
        )

    def _start(self, source: ValSource) -> DALIGenericIterator:
        image_size, _, batch_size, mean, std, num_workers = self._args
        pipe = val_graph(
            source, image_size, mean, std, **_pipeline_args(self.device, batch_size, num_workers)
        )
        with workers_ignore_stop_signals():
            pipe.build()
        return DALIGenericIterator([pipe], ["images", "labels", "report"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = started = 0
        source, iterator = self._source(step), None
        while True:
            try:
                if iterator is None:  # the iterator reads its first batch as it starts
                    iterator = self._start(source)
                out = next(iterator)[0]
            except StopIteration:
                break
            except Exception as error:  # DALI's error for the batch at `step`
                paths = source.handed_paths(step - started)
                _mark_undecodable(paths, self._known_bad, self.on_bad_image, error)
                # the same batches again, the bad files dropped
                source, iterator, started = self._source(step), None, step
                continue
            reports = decode_reports(out["report"])
            warn_skipped(reported_skips(reports), self.bad_files)
            step += 1
            kept = torch.tensor([not report for report in reports])
            if kept.any():
                yield (
                    out["images"][kept.to(out["images"].device)].to(self.device, non_blocking=True),
                    out["labels"].view(-1)[kept].to(self.device, non_blocking=True),
                )
