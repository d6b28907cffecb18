"""Dataset index of an ImageFolder tree, its fingerprint, image reading.

Indexing uses os.scandir, which returns names and file types in one directory read, and
one stat per image and per folder, so ImageNet's 1.28M files index in seconds.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from functools import cached_property
from itertools import zip_longest

import numpy as np
from PIL import Image, UnidentifiedImageError

JPEG_TAIL = 64  # bytes searched for the end-of-image marker: some writers pad after it
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadImageError(ValueError):
    """A file that cannot be read as an image; the message names the file."""


def warn_skipped(bad: list[tuple[str, str]], seen: set[str]) -> None:
    """Add each skipped file of `bad` ((path, reason) pairs) to `seen`, warning the first time
    a file is met: a loader counts distinct files, not the views that met them."""
    for path, message in bad:
        if path not in seen:
            seen.add(path)
            warnings.warn(f"skipped unreadable image (data.on_bad_image=skip): {message}",
                          stacklevel=3)


@dataclass
class DatasetIndex:
    """Files and labels of one split, in a stable order (classes sorted, files sorted)."""

    root: str
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    sizes: np.ndarray  # bytes per file, for the fingerprint

    def __len__(self) -> int:
        return len(self.paths)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the sorted relative paths with their sizes and labels."""
        prefix = os.path.join(self.root, "")
        rows = sorted(
            f"{p.removeprefix(prefix)}\t{s}\t{label}\n"
            for p, s, label in zip(self.paths, self.sizes.tolist(), self.labels.tolist())
        )
        return hashlib.sha256("".join(rows).encode()).hexdigest()

    @classmethod
    def from_folder(cls, root: str, split: str | None = "train") -> DatasetIndex:
        """Index root/split/<class>/**/<image>; every class folder must hold an image."""
        found = SplitFiles.walk(os.path.join(root, split) if split else root)
        stops = found.stops()
        if stops:
            raise ValueError(stops[0][1])
        files = [file for per_class in found.images for file in per_class]
        labels = np.repeat(np.arange(len(found.classes)), [len(f) for f in found.images])
        return cls(found.top, [p for p, _ in files], labels.astype(np.int64), found.classes,
                   np.asarray([s for _, s in files], np.int64))


@dataclass
class SplitFiles:
    """The files of a split folder, top/<class>/**/<file>, as torchvision's ImageFolder finds
    them: classes are the sorted folder names in top, images the files with an image
    extension anywhere under a class folder, links to folders followed."""

    top: str
    classes: list[str]
    images: list[list[tuple[str, int]]]  # per class: (path, bytes), sorted by path
    others: list[str]  # files without an image extension, which training ignores

    @classmethod
    def walk(cls, top: str) -> SplitFiles:
        if not os.path.isdir(top):
            raise FileNotFoundError(missing_split(top))
        with os.scandir(top) as entries:
            folders = sorted((e for e in entries if e.is_dir()), key=lambda e: e.name)
        found = cls(top, [e.name for e in folders], [], [])
        top_key = _folder_key(os.stat(top))
        for folder in folders:
            images: list[tuple[str, int]] = []
            _walk(folder.path, {top_key, _folder_key(folder.stat())}, images, found.others)
            found.images.append(sorted(images))
        return found

    def stops(self) -> list[tuple[str, str]]:
        """(folder, message) for each problem that stops training, in the order it meets them."""
        if not self.classes:
            return [(self.top, no_class_folders(self.top))]
        return [(path, empty_class_folder(path))
                for path, files in zip((os.path.join(self.top, c) for c in self.classes),
                                       self.images) if not files]


def _folder_key(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def _walk(folder: str, ancestors: set[tuple[int, int]], images: list[tuple[str, int]],
          others: list[str]) -> None:
    """Append the images (path, bytes) and other files under `folder` as
    os.walk(followlinks=True) meets them, with one stat per image and per folder."""
    with os.scandir(folder) as entries:
        for e in entries:
            if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file():  # the common case first
                images.append((e.path, e.stat().st_size))
            elif e.is_dir():
                key = _folder_key(e.stat())
                if key in ancestors:  # os.walk would descend until the path is too long
                    raise ValueError(folder_loop(e.path))
                _walk(e.path, ancestors | {key}, images, others)
            elif e.is_file():
                others.append(e.path)


# What stops training, worded once for the index (which raises it) and `data check` (which
# lists it).
def missing_split(top: str) -> str:
    return f"dataset split folder not found: {top} (expected {top}/<class>/<image>)"


def no_class_folders(top: str) -> str:
    return f"no class folders in {top} (expected {top}/<class>/<image>)"


def empty_class_folder(folder: str) -> str:
    return (f"class folder has no images: {folder} (no file in it or its subfolders ends in "
            f"{', '.join(IMAGE_EXTENSIONS)}, in any case); add images or remove the folder")


def folder_loop(link: str) -> str:
    return (f"folder link loop: {link} leads back to a folder that contains it; remove the "
            "link or point it elsewhere")


def split_classes_differ(root: str, train: list[str], val: list[str]) -> str | None:
    """Why training refuses root's train/ and val/ classes, or None when they match."""
    difference = class_difference(train, val)
    if difference is None:
        return None
    return (f"train/ and val/ of {root} have different class folders: {difference}. val/ "
            "needs one folder per class of train/, of the same name, and no other")


def class_difference(expected: list[str], found: list[str], expected_name: str = "train/",
                     found_name: str = "val/") -> str | None:
    """None when `found` equals `expected`, else a phrase naming the classes missing from
    and extra in `found` (at most 5 each), or the first label whose name differs."""
    if expected == found:
        return None
    expected_set, found_set = set(expected), set(found)
    parts = []
    missing = [c for c in expected if c not in found_set]
    extra = [c for c in found if c not in expected_set]
    if missing:
        parts.append(f"in {expected_name}, missing from {found_name}: {_some(missing)}")
    if extra:
        parts.append(f"extra in {found_name}, not in {expected_name}: {_some(extra)}")
    if parts:
        return "; ".join(parts)
    label, (a, b) = next((i, pair) for i, pair in enumerate(zip_longest(expected, found))
                         if pair[0] != pair[1])  # the same names, in another order or repeated
    return (f"the same names with other labels: label {label} is {_name(a)} in "
            f"{expected_name}, {_name(b)} in {found_name}")


def _some(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(map(repr, names[:shown])) + more


def _name(name: str | None) -> str:
    return "no class" if name is None else repr(name)


def jpeg_truncated(head: bytes, tail: bytes) -> bool:
    """A JPEG (by its first bytes) whose last bytes lack the end-of-image marker."""
    return head[:2] == b"\xff\xd8" and b"\xff\xd9" not in tail[-JPEG_TAIL:]


# start-of-frame markers: baseline, extended, progressive, lossless (Huffman or arithmetic)
_JPEG_SOF = frozenset(
    (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
)
_JPEG_STANDALONE = frozenset((0x01, *range(0xD0, 0xD9)))  # TEM, RSTn, SOI: no length field


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header by walking its markers, about 20x faster
    than opening it with PIL; None where that is not possible (not a JPEG, cut short, a
    frame of size 0): the caller then asks PIL, which names the problem."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF or marker in _JPEG_STANDALONE:  # fill byte or standalone marker
            pos += 1 if marker == 0xFF else 2
            continue
        if marker in _JPEG_SOF:
            if pos + 9 > end:
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return (height, width) if height and width else None
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def _pil_size(data: bytes, path: str) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL's own words would name the in-memory buffer, a new one at each read
        reason = "cannot identify image file" if isinstance(e, UnidentifiedImageError) else e
        raise BadImageError(f"cannot decode image {path}: not a readable image: {reason}") from None
    return height, width


def probe_image(data: bytes, path: str) -> tuple[int, int]:
    """(height, width) from an encoded image's header; BadImageError if it cannot be used."""
    size, limit = jpeg_size(data), Image.MAX_IMAGE_PIXELS
    if size is None or (limit and size[0] * size[1] > 2 * limit):
        size = _pil_size(data, path)  # PIL names what is wrong, and refuses decompression bombs
    if jpeg_truncated(data[:2], data[-JPEG_TAIL:]):
        raise BadImageError(f"cannot decode image {path}: truncated JPEG: no end-of-image marker")
    return size


def read_rgb(path: str) -> Image.Image:
    """Decode a file to an RGB PIL image (CMYK, grayscale, palette, alpha converted)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot decode image {path}: {e}") from None
