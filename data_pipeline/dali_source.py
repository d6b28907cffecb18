"""The DALI pipelines' Python sources (the `external_source` workers' side).

Each is a batch callback: for (epoch, iteration) it reads one rank's file bytes and finds
each image's size from its header; for training it takes the step's keys and replaces
unreadable files as train_loader.py does for both backends, draws the plan of the batch
(vectorised) as per-sample arrays and, with a teacher cache, reads the teacher's top-k from
its shards.

Each sample also carries its read's report: the (path, reason) of each file it skipped, or
the BadImageError that stops the run (on_bad_image=error), which the main process raises
when the batch arrives. A sample whose file could not be read shows a placeholder image.
"""

from __future__ import annotations

import functools
import io
import json

import numpy as np
import torch
from nvidia.dali import types
from PIL import Image

from .batch import TEACHER_FIELDS
from .dali_augment import dali_params
from .dataset import BadImageError, DatasetIndex, probe_image
from .plan import AugmentationPlan
from .teacher_cache import TeacherCache
from .train_loader import ListedKeys, SamplerKeys, read_or_replace

_SOURCE_OUTPUTS = (
    "encoded",
    "crop_anchor",
    "crop_shape",
    "flip",
    "ra_op",
    "ra_param",
    "erased",
    "erase_box",
    "noise",
    "labels",
    "samples",
    "repeats",
    "views",
    "report",
    "teacher_values",
    "teacher_indices",
)
# The source's outputs the graph hands through to the batch, beside the images.
PASSED_THROUGH = ("labels", "samples", "repeats", "views", "report")
Skipped = list[tuple[str, str]]  # (path, reason) of each unreadable file


@functools.cache
def _placeholder() -> tuple[np.ndarray, int, int]:
    """(bytes, height, width) of a valid 8x8 JPEG, which stands in for a file not read."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    return np.frombuffer(buffer.getvalue(), np.uint8), 8, 8


def encode_reports(reports: list[dict]) -> list[np.ndarray]:
    """Each sample's report ({"skipped": (path, reason) pairs} or {"error": message}, {} when
    its file was read) as JSON bytes, zero-padded to the batch's longest. The batch is the
    one way back from DALI's worker processes; it carries arrays, not strings, and the
    iterator stacks a batch's samples into one tensor."""
    data = [json.dumps(report).encode() if report else b"" for report in reports]
    width = max(1, *map(len, data))
    return [np.frombuffer(d.ljust(width, b"\0"), np.uint8) for d in data]


def decode_reports(column: torch.Tensor) -> list[dict]:
    """The reports encode_reports wrote, from a batch's uint8 [B, width] host tensor."""
    return [json.loads(bytes(row).rstrip(b"\0")) if row[0] else {} for row in column.numpy()]


def reported_skips(reports: list[dict]) -> Skipped:
    """The (path, reason) pairs of a batch's reports; a sample's error is raised here."""
    for report in reports:
        if "error" in report:
            raise BadImageError(report["error"])
    return [(path, reason) for report in reports for path, reason in report.get("skipped", ())]


def read_probe(path: str, known_bad: frozenset[str]) -> tuple[np.ndarray, int, int]:
    """(bytes, height, width) of a file whose header parses and DALI has not failed on."""
    if path in known_bad:
        raise BadImageError(f"cannot decode image {path}: DALI failed to decode it")
    with open(path, "rb") as f:
        data = f.read()
    height, width = probe_image(data, path)
    return np.frombuffer(data, np.uint8), height, width


class TrainSource:
    """Batch callback: (epoch, iteration) -> file bytes and the plan of one rank's batch."""

    def __init__(
        self,
        index: DatasetIndex,
        plan: AugmentationPlan,
        keys: SamplerKeys | ListedKeys,
        on_bad_image: str,
        known_bad: frozenset[str],
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        self.paths, self.labels, self.plan, self.keys = index.paths, index.labels, plan, keys
        self.on_bad_image, self.known_bad = on_bad_image, known_bad
        self.teacher_cache = teacher_cache
        skipped = () if plan.params.rand_augment_config else ("ra_op", "ra_param")
        if teacher_cache is None:
            skipped += TEACHER_FIELDS
        self.outputs = [name for name in _SOURCE_OUTPUTS if name not in skipped]
        self.passed_through = [name for name in self.outputs if name in PASSED_THROUGH
                               or name in TEACHER_FIELDS]

    def _read(self, view: int, sample: int) -> tuple[np.ndarray, int, int, int, dict]:
        """(bytes, height, width, sample read, report)."""
        read = lambda path: read_probe(path, self.known_bad)
        try:
            (data, height, width), shown, skipped = read_or_replace(
                read, self.paths, self.plan.seed, view, sample, self.on_bad_image
            )
        except BadImageError as e:  # the main process raises it: DALI would keep only its text
            return *_placeholder(), sample, {"error": str(e)}
        return data, height, width, shown, {"skipped": skipped} if skipped else {}

    def handed_paths(self, iteration: int) -> list[str]:
        """The files this source hands DALI for `iteration` of its first epoch (read again:
        a batch DALI failed to decode never reaches the main process)."""
        views, requested, _, _, _ = self.keys.at(0, iteration)
        reads = [self._read(v, s) for v, s in zip(views.tolist(), requested.tolist())]
        return [self.paths[shown] for _, _, _, shown, report in reads if "error" not in report]

    def __call__(self, info: types.BatchInfo) -> tuple[list[np.ndarray], ...]:
        if info.iteration >= self.keys.steps(info.epoch_idx):
            raise StopIteration
        views, requested, repeats, groups, rows = self.keys.at(info.epoch_idx, info.iteration)
        data, heights, widths, samples, reports = zip(
            *(self._read(v, s) for v, s in zip(views.tolist(), requested.tolist()))
        )
        samples = np.asarray(samples, np.int64)
        d = self.plan.draw(views, samples, heights, widths)
        top, left, h, w = d.crop.T.astype(np.int32)
        ra_param = dali_params(d.ra_op, d.ra_param)
        noise = [  # (3, 1, 1) stands in where there is no box: every sample needs a tensor
            self.plan.erase_noise(int(views[i]), int(samples[i]), eh, ew)
            if eh
            else np.zeros((3, 1, 1), np.float32)
            for i, (_, _, eh, ew) in enumerate(d.erase.tolist())
        ]
        scalar = lambda a, dtype: [np.asarray(v, dtype) for v in a]
        fields = {
            "encoded": list(data),
            "crop_anchor": [np.array(a, np.int32) for a in zip(left, top)],  # (x, y) order
            "crop_shape": [np.array(s, np.int32) for s in zip(w, h)],
            "flip": scalar(d.flip, np.int32),
            "ra_op": list(d.ra_op.astype(np.int32)),
            "ra_param": list(ra_param),
            "erased": scalar(d.erase[:, 2] > 0, bool),
            "erase_box": list(d.erase.astype(np.float32)),
            "noise": noise,
            "labels": scalar(self.labels[samples], np.int64),
            "samples": scalar(samples, np.int64),
            "repeats": scalar(repeats, np.int64),
            "views": scalar(views, np.int64),
            "report": encode_reports(list(reports)),
        }
        if self.teacher_cache is not None:  # by the key's cache address; DALI prefetches
            # past the run's last epoch: the loader checks what it yields
            values, indices = self.teacher_cache.topk(groups, rows, strict=False)
            fields["teacher_values"] = list(values.numpy())
            fields["teacher_indices"] = list(indices.numpy())
        return tuple(fields[name] for name in self.outputs)


class ValSource:
    """Batch callback for one rank's validation shard: bytes, resize size and crop anchor."""

    def __init__(
        self,
        index: DatasetIndex,
        indices: list[int],
        batch_size: int,
        image_size: int,
        crop_pct: float,
        on_bad_image: str,
        known_bad: frozenset[str],
    ) -> None:
        self.paths, self.labels, self.indices = index.paths, index.labels, indices
        self.batch_size, self.size, self.on_bad_image = batch_size, image_size, on_bad_image
        self.resize, self.known_bad = int(image_size / crop_pct), known_bad

    def batch_indices(self, step: int) -> list[int]:
        return self.indices[step * self.batch_size : (step + 1) * self.batch_size]

    def _read(self, i: int) -> tuple[np.ndarray, int, int, dict]:
        """(bytes, height, width, report); a placeholder image for a file not read."""
        try:
            return *read_probe(self.paths[i], self.known_bad), {}
        except BadImageError as e:
            if self.on_bad_image == "error":
                return *_placeholder(), {"error": str(e)}
            return *_placeholder(), {"skipped": [(self.paths[i], str(e))]}

    def handed_paths(self, iteration: int) -> list[str]:
        """The files this source hands DALI for `iteration` (read again: a batch DALI failed
        to decode never reaches the main process)."""
        return [self.paths[i] for i in self.batch_indices(iteration) if not self._read(i)[3]]

    def __call__(self, info: types.BatchInfo) -> tuple[list[np.ndarray], ...]:
        picks = self.batch_indices(info.iteration)
        if not picks:
            raise StopIteration
        rows = []
        for i in picks:
            data, height, width, report = self._read(i)
            short, long = sorted((height, width))  # torchvision: the long side is truncated
            scaled = (self.resize, int(self.resize * long / short))
            new_h, new_w = scaled if height <= width else scaled[::-1]
            crop = (round((new_h - self.size) / 2), round((new_w - self.size) / 2))
            rows.append(
                (
                    data,
                    np.array([new_h, new_w], np.float32),
                    np.array(crop, np.float32),
                    np.asarray(self.labels[i], np.int64),
                    report,
                )
            )
        encoded, resize, crop, labels, reports = (list(column) for column in zip(*rows))
        return encoded, resize, crop, labels, encode_reports(reports)
