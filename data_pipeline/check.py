"""`deit-fast data check`: find the files a training run would skip, and what stops it.

The fast pass reads each header (format, size, mode) and the last bytes of each JPEG,
whose end-of-image marker is missing when a download was cut short; `full_decode`
decodes every pixel as training would. Unreadable files are skipped by training
(data.on_bad_image=skip); a missing split, a split without class folders, an empty class
folder and train/ and val/ with different classes stop it, worded as training words them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from PIL import Image

from .dataset import (
    JPEG_TAIL,
    BadImageError,
    SplitFiles,
    jpeg_truncated,
    read_rgb,
    split_classes_differ,
)

STOPS_TRAINING = "stops training:"
# a run with train.eval_interval=0 reads no val/
STOPS_TRAINING_WITH_VAL = "stops training unless train.eval_interval=0:"


def check_image(path: str, full_decode: bool = False) -> str | None:
    """Why `path` cannot be trained on, or None if it can."""
    if full_decode:
        try:
            read_rgb(path)
        except BadImageError as e:
            return str(e).removeprefix(f"cannot decode image {path}: ")
        return None
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"not a readable image: {e}"
    if width < 1 or height < 1:
        return f"empty image ({width}x{height})"
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(max(0, os.fstat(f.fileno()).st_size - JPEG_TAIL))
        tail = f.read()
    if jpeg_truncated(head, tail):
        return "truncated JPEG: no end-of-image marker"
    return None


@dataclass
class DataCheck:
    """What `data check` found: the image count of each class of each split folder checked,
    and (path, reason) for each problem, the reason starting with STOPS_TRAINING or
    STOPS_TRAINING_WITH_VAL where it stops training."""

    splits: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def stopping(self) -> int:
        stops = (STOPS_TRAINING, STOPS_TRAINING_WITH_VAL)
        return sum(reason.startswith(stops) for _, reason in self.problems)


def check_dataset(root: str, full_decode: bool = False) -> DataCheck:
    """Every problem under root that stops training or makes it skip a file.

    root is a dataset, root/train/<class>/**/<image> and root/val/..., checked as training
    reads it (both splits, the same classes), or one split folder named train or val.
    Files without an image extension in class folders are listed as not images.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder not found: {root}")
    root = os.path.normpath(root)
    name = os.path.basename(root)
    tops = {name: root} if name in ("train", "val") else {
        split: os.path.join(root, split) for split in ("train", "val")}
    report, found = DataCheck(), {}
    for split, top in tops.items():
        stops = STOPS_TRAINING_WITH_VAL if split == "val" else STOPS_TRAINING
        try:
            files = found[split] = SplitFiles.walk(top)
        except (FileNotFoundError, ValueError) as err:  # no such split folder, a link loop
            report.problems.append((top, f"{stops} {err}"))
            continue
        report.splits[top] = [(c, len(images)) for c, images in zip(files.classes, files.images)]
        report.problems.extend((path, f"{stops} {message}")
                               for path, message in files.stops())
        bad = [(path, "not an image file (extension)") for path in files.others]
        for path, _ in (image for images in files.images for image in images):
            reason = check_image(path, full_decode)
            if reason:
                bad.append((path, reason))
        report.problems.extend(sorted(bad))
    train, val = found.get("train"), found.get("val")
    if train and val and train.classes and val.classes:
        differ = split_classes_differ(root, train.classes, val.classes)
        if differ:
            report.problems.append((tops["val"], f"{STOPS_TRAINING_WITH_VAL} {differ}"))
    return report


def split_summary(top: str, counts: list[tuple[str, int]], listed: int = 20) -> list[str]:
    """A line with the split's class and image counts, then each class's image count, or
    with more than `listed` classes the smallest and the largest."""
    lines = [f"{top}: {len(counts)} classes, {sum(n for _, n in counts)} images"]
    if len(counts) <= listed:
        return lines + [f"  {name}: {n} images" for name, n in counts]
    (small, n_small), (large, n_large) = (min(counts, key=lambda c: c[1]),
                                          max(counts, key=lambda c: c[1]))
    return lines + [f"  smallest class {small!r}: {n_small} images; largest class "
                    f"{large!r}: {n_large} images"]
