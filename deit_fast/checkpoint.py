"""Checkpoint files: written atomically (data_pipeline.files), so a crash or a full disk
while writing leaves the previous checkpoint intact; they hold only tensors and plain
Python values, so they load with `weights_only=True`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deit_fast.data_pipeline.files import atomic_write

FORMAT_VERSION = 1


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """torch.save, written whole or not at all (data_pipeline.files.atomic_write): a failure
    (a full disk, no permission) raises OSError naming `path` and the cause."""
    with atomic_write(path, "checkpoint") as f:
        torch.save(state, f)


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
