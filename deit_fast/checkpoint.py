"""Atomic checkpoint files: written to a temporary name, fsynced, then renamed.

A crash or a full disk while writing leaves the previous checkpoint intact. Files hold
only tensors and plain Python values, so they load with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


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


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temporary file beside `path`, fsync, rename over `path`; a failure
    (a full disk, no permission) raises OSError naming `path` and the cause."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):
            raise write_error(err, path, "checkpoint") from err
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete the temporary files of writes that a kill interrupted before their rename."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file (weights_only: tensors and plain values) or raise naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {str(path)!r} cannot be read as a torch weights file: "
                         f"{err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a dict")
    return state


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_run(state: dict[str, Any], source: str, model_name: str, classes: list[str] | None,
              fingerprint: str) -> None:
    """ValueError unless checkpoint `state` was written for this model, these classes (by
    name, in order) and this dataset (its fingerprint); what a checkpoint lacks is not
    checked."""
    from deit_fast.data_pipeline.dataset import class_difference

    if state.get("model_name") != model_name:
        raise ValueError(f"{source} was written for model {state.get('model_name')!r}, this "
                         f"run's model.name is {model_name!r}")
    saved = state.get("classes")
    if classes is not None and saved is not None and saved != classes:
        raise ValueError(f"{source} was written for other classes than this run's train/ "
                         f"folders: {class_difference(saved, classes, 'the checkpoint', 'train/')}")
    if fingerprint and state.get("fingerprint") not in ("", None, fingerprint):
        raise ValueError(f"{source} was written for another dataset (fingerprint "
                         f"{state.get('fingerprint')!r}, this run's {fingerprint!r})")
