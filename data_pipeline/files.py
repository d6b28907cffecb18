"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

`atomic_write(path, what)` yields a binary file beside `path`; when the block ends it is
fsynced and renamed over `path`, and the rename is made durable. A failure (a full disk, no
permission, the writer's own error) removes the temporary file and raises OSError naming
`path`, what it is and the cause; the previous file stays. Checkpoints, the teacher cache,
metrics.jsonl and the curves are all written this way. A kill leaves at most a temporary
`.<name>.<random>.tmp` beside the file (`remove_temporaries` clears them).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def write_error(err: BaseException, path: str | Path, what: str) -> OSError:
    """An OSError naming `path` and the cause (no space, not permitted...) of a failed write.
    torch.save reports a full disk as RuntimeError ("unexpected pos"); the OSError behind it
    is found in the exception's context."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        errno, reason = cause.errno, cause.strerror or str(cause)
    else:
        errno, reason = None, str(err)
    return OSError(errno, f"could not write {what} {str(path)!r} ({reason}); the previous "
                          f"{what} is unchanged")


@contextlib.contextmanager
def atomic_write(path: str | Path, what: str) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` whole when the block ends; see the module."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):
            raise write_error(err, path, what) from err
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def remove_temporaries(folder: str | Path) -> None:
    """Delete the temporary files of writes that a kill interrupted before their rename."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
