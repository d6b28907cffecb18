"""The teacher-logit cache: the teacher's top-k log-probabilities, on disk, in one of two modes.

Modes (`CACHE_MODES`, distill.cache_mode). "batches": the teacher's output on each mixed
image a run trains on, addressed by (epoch, row), row = the item's place in the epoch's
global order of batches (`batch_rows`: step-major, then rank, then position); the pass
replays the run's batches and their Mixup/CutMix, so it gives the loss what the online
teacher gives it, and fixes the batch layout (per-rank batch, world size, mixing recipe).
"views": the teacher's output on each unmixed view, addressed by (view, sample), mixed
after the lookup as mix(teacher(a), teacher(b)), an approximation of teacher(mix(a, b));
such a cache serves any batch layout and may hold fewer views than the run shows.

Layout. Each group (an epoch, or a view) is cut into shards of `shard_rows` rows; a shard
is one plain binary file: the values (float16 [n, k], the teacher's top-k log-softmax,
i.e. its logits shifted by their logsumexp, so the mass outside the top-k is known), then
the class indices (int16 [n, k], int32 above 32767 classes). A row the planned run never
reads is not computed: its class index is -1. `manifest.json` says what the cache was
built from and holds a sha256 per shard. No pickle anywhere.

Writing. The pass starts by writing an incomplete manifest (`complete: false`); a shard
is written to a temporary name, fsynced and renamed, then its checksum goes to
`<shard>.sha256` the same way; a shard with both files and a matching checksum is
complete, so an interrupted pass resumes by skipping those. An incomplete manifest of
another configuration (say, a mistyped teacher) is replaced, with its shards; a complete
one is never overwritten. Whichever writer completes the last shard writes the final
manifest, so ranks need no barrier.

Reading. `TeacherCache` checks every shard's size and checksum once, in the process that
opens it; the loader's workers receive it (pickled without its memory maps), map the
shards on first use and look up (group, row) by arithmetic on the two numbers.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .dataset import class_difference
from .files import atomic_write

FORMAT_VERSION = 4  # 4: the batches mode; 3: keyed random domains, timm's RandAugment
CACHE_MODES = ("batches", "views")  # distill.cache_mode
# what a group of rows is, and a row in it, in each mode
ADDRESS = {"batches": ("epoch", "row"), "views": ("view", "sample")}
MANIFEST = "manifest.json"
NOT_SHOWN = -1  # the class index of a row the planned run never reads
# Fields a run must agree on with the cache (those of its mode); the rest is bookkeeping.
IDENTITY_FIELDS = ("cache_mode", "classes", "dataset_fingerprint", "num_samples", "seed", "plan",
                   "repeats", "num_classes", "teacher", "teacher_checkpoint_sha256", "topk",
                   "epochs", "views_backend", "num_views", "batch_size", "world_size", "mixup")
PRODUCE_HINT = "produce it with `deit-fast cache-teacher --config FILE` (same config as the run)"


def batch_rows(first_item: int, rank: int, batch_size: int) -> np.ndarray:
    """The rows, in a batches-mode cache, of rank `rank`'s batch of the global step that
    starts at item `first_item` of its epoch: the steps' items in rank-major order."""
    return first_item + rank * batch_size + np.arange(batch_size, dtype=np.int64)


class TeacherCacheError(ValueError):
    """A cache that is missing, incomplete, corrupted or truncated; the message names it."""


class TeacherCacheMismatch(TeacherCacheError):
    """A cache built for another dataset, seed, plan, teacher or class count."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32)


def _write(path: Path, data: bytes) -> None:
    with atomic_write(path, "cache file") as f:
        f.write(data)


@dataclass(frozen=True)
class ShardSpec:
    name: str
    group: int
    first_row: int
    count: int


class CacheLayout:
    """Which shard holds (group, row), and where in it."""

    def __init__(self, mode: str, groups: int, rows: int, shard_rows: int) -> None:
        self.label, self.groups, self.rows, self.shard_rows = ADDRESS[mode][0], groups, rows, \
            shard_rows
        self.chunks_per_group = -(-rows // shard_rows)

    def shards(self) -> list[ShardSpec]:
        out = []
        for group in range(self.groups):
            for chunk in range(self.chunks_per_group):
                first = chunk * self.shard_rows
                count = min(self.shard_rows, self.rows - first)
                out.append(ShardSpec(f"{self.label}{group:05d}_chunk{chunk:05d}.bin", group,
                                     first, count))
        return out


def row_bytes(topk: int, num_classes: int) -> int:
    """Bytes of one row on disk: k float16 values and k class indices."""
    return topk * (2 + index_dtype(num_classes).itemsize)


def manifest_header(identity: dict[str, Any], *, groups: int, rows: int, shard_rows: int,
                    forwards: int) -> dict[str, Any]:
    """The manifest without its shard list, in JSON-plain values: `identity` (the fields of
    IDENTITY_FIELDS the cache's mode uses, with cache_mode, topk and num_classes), its
    geometry (groups of rows, rows per shard) and `forwards`, the teacher forwards of the
    pass (the rows the run reads)."""
    num_classes = identity["num_classes"]
    return json.loads(json.dumps({
        "format_version": FORMAT_VERSION, **identity,
        "groups": groups, "rows": rows, "shard_rows": shard_rows, "forwards": forwards,
        "values": "float16 top-k log_softmax", "index_dtype": index_dtype(num_classes).name,
        "complete": False, "shards": [],
    }))


def first_mismatch(manifest: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """The first identity field (or the format version) where the two differ, or None."""
    for key in ("format_version", *IDENTITY_FIELDS):
        if key in expected and manifest.get(key) != expected[key]:
            return key
    return None


def field_difference(key: str, cached: Any, expected: Any) -> str:
    """How identity field `key` of a cache differs from the run's: for classes, those missing
    and extra (a thousand names), else both values."""
    if key == "classes":
        return f"differs: {class_difference(cached or [], expected, 'the cache', 'train/')}"
    return f"is {cached!r} in the cache, {expected!r} in the run"


def check_manifest(manifest: dict[str, Any], expected: dict[str, Any], where: str,
                   warn_only: tuple[str, ...] = ()) -> None:
    """Refuse a cache whose identity differs from `expected` (fields absent there are
    skipped); a differing field named in warn_only is a warning instead."""
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TeacherCacheMismatch(
            f"teacher cache {where} was written by another version of deit-fast (field "
            f"'format_version' is {manifest.get('format_version')!r}, this one reads "
            f"{FORMAT_VERSION}, and draws its views and batches differently): rebuild it in "
            f"another distill.cache_dir, or remove {where} first; {PRODUCE_HINT}")
    for key in IDENTITY_FIELDS:
        if key in expected and manifest.get(key) != expected[key]:
            message = (f"teacher cache {where} does not match this run: field {key!r} "
                       f"{field_difference(key, manifest.get(key), expected[key])}")
            if key in warn_only:
                warnings.warn(message, stacklevel=2)
                continue
            raise TeacherCacheMismatch(f"{message}; use another distill.cache_dir or "
                                       f"{PRODUCE_HINT}")


class ShardWriter:
    """Writes the shards of one cache directory; see the module docstring for restarts."""

    def __init__(self, cache_dir: str | Path, header: dict[str, Any]) -> None:
        self.dir, self.header = Path(cache_dir), header
        self.layout = layout_of(header)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / MANIFEST
        if path.is_file():
            found = json.loads(path.read_text())
            if found.get("complete"):  # a finished cache is refused, never overwritten
                check_manifest(found, header, str(self.dir))
                return
            differs = first_mismatch(found, header)
            if differs is None:  # resuming the same pass: its finished shards are kept
                return
            change = field_difference(differs, found.get(differs), header[differs])
            warnings.warn(f"teacher cache {self.dir}: replacing an incomplete pass whose field "
                          f"{differs!r} {change}", stacklevel=2)
            for stale in [*self.dir.glob("*_chunk*.bin"), *self.dir.glob("*.sha256")]:
                stale.unlink()
        _write(path, json.dumps(header, indent=1).encode())

    def is_complete(self, shard: ShardSpec) -> bool:
        path, check = self.dir / shard.name, self.dir / f"{shard.name}.sha256"
        return path.is_file() and check.is_file() and \
            check.read_text().strip() == sha256_file(path)

    def write(self, shard: ShardSpec, values: np.ndarray, indices: np.ndarray) -> None:
        """values float [count, k], indices int [count, k] (NOT_SHOWN rows: not computed)."""
        k, dtype = self.header["topk"], index_dtype(self.header["num_classes"])
        if values.shape != (shard.count, k) or indices.shape != (shard.count, k):
            raise ValueError(f"shard {shard.name}: expected [{shard.count}, {k}] values and "
                             f"indices, got {values.shape} and {indices.shape}")
        data = values.astype(np.float16).tobytes() + indices.astype(dtype).tobytes()
        _write(self.dir / shard.name, data)
        _write(self.dir / f"{shard.name}.sha256",
                      hashlib.sha256(data).hexdigest().encode())

    def finalize(self) -> bool:
        """Write the complete manifest when every shard is done; True if it was written."""
        shards = self.layout.shards()
        checks = [self.dir / f"{s.name}.sha256" for s in shards]
        if not all(c.is_file() for c in checks):
            return False
        manifest = dict(self.header, complete=True, shards=[
            {"file": s.name, "group": s.group, "first_row": s.first_row, "count": s.count,
             "sha256": c.read_text().strip()} for s, c in zip(shards, checks)])
        _write(self.dir / MANIFEST, json.dumps(manifest, indent=1).encode())
        return True


def layout_of(manifest: dict[str, Any]) -> CacheLayout:
    return CacheLayout(manifest["cache_mode"], manifest["groups"], manifest["rows"],
                       manifest["shard_rows"])


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise TeacherCacheError(f"no teacher cache at {cache_dir} ({MANIFEST} missing); "
                                f"{PRODUCE_HINT}")
    return json.loads(path.read_text())


class TeacherCache:
    """Top-k teacher log-probabilities by (group, row): (epoch, row) in a batches cache,
    (view, sample) in a views cache. Checked on open; picklable (a loader worker maps the
    shards itself on its first lookup)."""

    def __init__(self, cache_dir: str | Path, verify: bool = True) -> None:
        self.dir = Path(cache_dir)
        self.manifest = m = read_manifest(cache_dir)
        check_manifest(m, {}, str(self.dir))
        if not m["complete"]:
            raise TeacherCacheError(f"teacher cache {cache_dir} is incomplete (an interrupted "
                                    f"pass?); run the same command again to finish it: "
                                    f"{PRODUCE_HINT}")
        self.mode, self.num_classes, self.k = m["cache_mode"], m["num_classes"], m["topk"]
        self.layout = layout_of(m)
        self._dtype = np.dtype(m["index_dtype"])
        for entry in m["shards"]:
            path = self.dir / entry["file"]
            size = entry["count"] * row_bytes(self.k, self.num_classes)
            if not path.is_file():
                raise TeacherCacheError(f"teacher cache shard {path} is missing; {PRODUCE_HINT}")
            if path.stat().st_size != size:
                raise TeacherCacheError(f"teacher cache shard {path} is truncated: "
                                        f"{path.stat().st_size} bytes, expected {size}")
            if verify and sha256_file(path) != entry["sha256"]:
                raise TeacherCacheError(f"teacher cache shard {path} is corrupted: its sha256 "
                                        f"differs from the manifest's")
        self._maps: list[tuple[np.ndarray, np.ndarray]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}  # memory maps do not travel; workers remap

    def _shards(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._maps is None:
            self._maps = []
            for entry in self.manifest["shards"]:
                path, n, k = self.dir / entry["file"], entry["count"], self.k
                self._maps.append((np.memmap(path, np.float16, "r", 0, (n, k)),
                                   np.memmap(path, self._dtype, "r", n * k * 2, (n, k))))
        return self._maps

    def topk(self, groups: np.ndarray, rows: np.ndarray, strict: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities float32 [B, k], class indices int64 [B, k]), CPU tensors.
        strict=False lets rows the planned run never reads through as NOT_SHOWN (groups past
        the cache's too), for a reader that prefetches past the run's end and checks what
        it hands on (`check_shown`)."""
        groups, rows = np.asarray(groups, np.int64), np.asarray(rows, np.int64)
        label, row_label = ADDRESS[self.mode]
        held = (groups >= 0) & (groups < self.layout.groups)
        if strict and not held.all():
            hint = "set distill.num_views or " if self.mode == "views" else ""
            raise TeacherCacheError(
                f"{label} {int(groups[~held][0])} is not in the teacher cache at {self.dir}, "
                f"which holds {label}s 0..{self.layout.groups - 1}; {hint}{PRODUCE_HINT}")
        if rows.size and (rows.min() < 0 or rows.max() >= self.layout.rows):
            raise TeacherCacheError(f"{row_label} {int(rows.max())} is not in the teacher cache "
                                    f"at {self.dir} ({self.layout.rows} {row_label}s a {label})")
        chunk, offset = np.divmod(rows, self.layout.shard_rows)
        shard = groups * self.layout.chunks_per_group + chunk
        values = np.zeros((len(groups), self.k), np.float32)
        indices = np.full((len(groups), self.k), NOT_SHOWN, np.int64)
        maps = self._shards()
        for s in np.unique(shard[held]):  # one fancy-index per touched shard
            mine = held & (shard == s)
            values[mine] = maps[s][0][offset[mine]]
            indices[mine] = maps[s][1][offset[mine]]
        if strict:
            self.check_shown(indices, lambda: f"{label}s {np.unique(groups).tolist()}")
        return torch.from_numpy(values), torch.from_numpy(indices)

    def check_shown(self, indices: np.ndarray | torch.Tensor, where: Callable[[], str]
                    ) -> None:
        """Refuse a batch with a row the cache did not compute; `where()` names the batch
        (called only then: the check runs on every batch)."""
        if (np.asarray(indices)[:, 0] == NOT_SHOWN).any():
            raise TeacherCacheError(
                f"teacher cache {self.dir} has no entry for a sample of the batch of {where()}: "
                f"it holds what {self.manifest['epochs']} epochs with data.repeats="
                f"{self.manifest['repeats']} show; {PRODUCE_HINT}")


def rebuild_distribution(log_probs: torch.Tensor, indices: torch.Tensor, num_classes: int,
                         tau: float = 1.0) -> torch.Tensor:
    """softmax(teacher logits / tau) from the top-k log-probabilities: the mass outside the
    top-k is spread evenly over the other classes (as if their logits were all equal)."""
    log_probs, k = log_probs.float(), log_probs.shape[1]
    rest = (1 - log_probs.exp().sum(dim=1, keepdim=True)).clamp_(min=0)
    rest_log = torch.log(rest / (num_classes - k)) if num_classes > k else \
        torch.full_like(rest, float("-inf"))
    full = rest_log.expand(-1, num_classes).clone()
    full.scatter_(1, indices, log_probs)
    return torch.softmax(full / tau, dim=1)
