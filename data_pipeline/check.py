"""`deit-fast data check`: find the files a training run would skip, and what stops it.

The fast pass reads each header (format, size, mode) and the last bytes of each JPEG,
whose end-of-image marker is missing when a download was cut short; `full_decode`
decodes every pixel as training would. Unreadable files are skipped by training
(data.on_bad_image=skip); an empty class folder stops it, and its reason says so.
"""

from __future__ import annotations

import os

from PIL import Image

from .dataset import (
    IMAGE_EXTENSIONS,
    JPEG_TAIL,
    BadImageError,
    jpeg_truncated,
    read_rgb,
)

STOPS_TRAINING = "stops training:"


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


def check_dataset(root: str, full_decode: bool = False) -> list[tuple[str, str]]:
    """(path, reason) for every unreadable image and empty class folder under root.

    root is a split folder (root/<class>/<image>) or a dataset with split folders
    (root/train/<class>/<image>); other files in class folders are listed as not images.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder not found: {root}")
    splits = [e.path for e in os.scandir(root) if e.is_dir() and e.name in ("train", "val")]
    problems: list[tuple[str, str]] = []
    for top in sorted(splits) or [root]:
        for folder in sorted(e.path for e in os.scandir(top) if e.is_dir()):
            files = sorted(e.path for e in os.scandir(folder) if e.is_file())
            images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
            if not images:
                problems.append((folder, f"{STOPS_TRAINING} class folder has no images "
                                         "(add images or remove the folder)"))
            problems.extend((f, "not an image file (extension)") for f in files if f not in images)
            for path in images:
                reason = check_image(path, full_decode)
                if reason:
                    problems.append((path, reason))
    return problems
