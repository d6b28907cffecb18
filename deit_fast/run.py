"""Builds a run from a config: device, kernels, data, model, loss; then trains or evaluates."""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deit_fast import checkpoint, distributed
from deit_fast.config import Config, ConfigError, save_config, to_dict
from deit_fast.losses import DistillationLoss
from deit_fast.models import create_model, load_checkpoint
from deit_fast.ops import resolve_kernels
from deit_fast.resolve import (
    build_mixup,
    cache_identity,
    data_root,
    image_size,
    num_views,
    resolve_device,
    train_loading,
    val_loading,
)
from deit_fast.teacher import TeacherTargets, load_teacher
from deit_fast.train import Trainer

if TYPE_CHECKING:
    from deit_fast.data_pipeline import DatasetIndex
    from deit_fast.data_pipeline.teacher_cache import TeacherCache


def build_model(cfg: Config, num_classes: int, device: torch.device,
                classes: list[str] | None = None) -> nn.Module:
    """model.name (a deit-fast DeiT with the configured kernels, or a timm model), from
    model.init_checkpoint when set; its head starts afresh where the checkpoint names other
    classes than `classes` (the run's)."""
    kernels = resolve_kernels(cfg.kernels.attention, cfg.kernels.layernorm, cfg.kernels.gelu,
                              device)
    try:
        model = create_model(cfg.model.name, kernels=kernels, img_size=cfg.model.img_size,
                             num_classes=num_classes, drop_path_rate=cfg.model.drop_path)
    except TypeError as err:  # a timm model without the argument
        raise ConfigError(f"model.name {cfg.model.name!r}: timm cannot build it as configured "
                          f"({err}); model.drop_path=0.0 turns the drop path rate off") from err
    if cfg.model.init_checkpoint:
        from deit_fast.data_pipeline.dataset import class_difference

        try:
            state = checkpoint.load(cfg.model.init_checkpoint)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"model.init_checkpoint: {err}") from err
        saved = state.get("classes")
        other = class_difference(saved, classes, "the checkpoint", "train/") \
            if saved and classes else None
        load_checkpoint(model, state, new_head=True,
                        fresh_head=other and f"other classes ({other})")
    return model.to(device)


def uses_cache(cfg: Config) -> bool:
    return cfg.distill.type != "none" and cfg.distill.source == "cache"


def open_teacher_cache(cfg: Config, index: DatasetIndex, device: torch.device,
                       world_size: int = 1) -> TeacherCache | None:
    """With distill.source=cache: the cache, after checking that it was built for this run
    (cache_identity: dataset, seed, plan, repeats, classes, decoder, teacher, and the views
    or the batch layout of its mode) and for no fewer epochs."""
    if not uses_cache(cfg):
        return None
    from deit_fast.data_pipeline.teacher_cache import (
        PRODUCE_HINT,
        TeacherCache,
        TeacherCacheMismatch,
        check_manifest,
        sha256_file,
    )

    d = cfg.distill
    cache = TeacherCache(d.cache_dir)
    teacher_sha = sha256_file(d.teacher_checkpoint) if d.teacher_checkpoint else ""
    expected = cache_identity(cfg, index, teacher_sha, device, world_size)
    unset = {"topk": True, "epochs": True, "teacher": not d.teacher,  # the cache's own are used
             "teacher_checkpoint_sha256": not d.teacher_checkpoint}
    warn = ("views_backend",) if d.allow_backend_mismatch else ()
    check_manifest(cache.manifest, {k: v for k, v in expected.items() if not unset.get(k)},
                   d.cache_dir, warn_only=warn)
    if cfg.train.epochs > cache.manifest["epochs"]:
        raise TeacherCacheMismatch(
            f"teacher cache {d.cache_dir} does not match this run: field 'epochs' is "
            f"{cache.manifest['epochs']} in the cache, {cfg.train.epochs} in the run (it holds "
            f"the views of its epochs only); {PRODUCE_HINT}")
    if d.cache_mode == "views":
        warn_view_reuse(cfg)
    return cache


def warn_view_reuse(cfg: Config) -> None:
    """A views cache of fewer views than the run shows makes views repeat: say so, once."""
    from deit_fast.data_pipeline.sampler import full_views

    views, fresh = num_views(cfg), full_views(cfg.train.epochs, cfg.data.repeats)
    if views < fresh:
        warnings.warn(f"the teacher cache in {cfg.distill.cache_dir} holds {views} views, this "
                      f"run shows {fresh} (train.epochs={cfg.train.epochs}, data.repeats="
                      f"{cfg.data.repeats}): views repeat; build a cache without "
                      "distill.num_views for one fresh view per showing", stacklevel=3)


def build_data(cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1):
    """(train index, train loader, val loader or None with train.eval_interval=0, mixup)
    from the data_pipeline package; with a teacher cache, the train loader's workers attach
    its top-k to every batch."""
    from deit_fast.data_pipeline import (
        DatasetIndex,
        build_train_loader,
        build_val_loader,
    )
    from deit_fast.data_pipeline.dataset import split_classes_differ

    root = data_root(cfg)
    train_index = DatasetIndex.from_folder(root, split="train")
    val_loader = None
    if cfg.train.eval_interval:  # 0: the run never evaluates, and needs no val/
        val_index = DatasetIndex.from_folder(root, split="val")
        differ = split_classes_differ(str(root), train_index.classes, val_index.classes)
        if differ:
            raise ValueError(differ)
        val_loader = build_val_loader(val_index, **val_loading(cfg, device), rank=rank,
                                      world_size=world_size)
    cache = open_teacher_cache(cfg, train_index, device, world_size)
    train_loader = build_train_loader(
        train_index, **train_loading(cfg, device), rank=rank, world_size=world_size,
        num_views=num_views(cfg) if cache and cache.mode == "views" else None,
        teacher_cache=cache)
    mixup = build_mixup(cfg.data, len(train_index.classes), cfg.train.seed)
    return train_index, train_loader, val_loader, mixup


def build_criterion(cfg: Config) -> DistillationLoss:
    return DistillationLoss(cfg.distill.type, cfg.distill.alpha, cfg.distill.tau)


def build_teacher_targets(cfg: Config, num_classes: int, device: torch.device
                          ) -> TeacherTargets | None:
    """The teacher's side of the loss: None without distillation; the online teacher
    (distill.source=online), or the cached top-k the batches carry (cache, of its mode)."""
    d = cfg.distill
    if d.type == "none":
        return None
    if d.source == "cache":
        return TeacherTargets(d.type, d.tau, num_classes, cache_mode=d.cache_mode)
    teacher = load_teacher(d.teacher, d.teacher_checkpoint, num_classes, device, image_size(cfg))
    return TeacherTargets(d.type, d.tau, num_classes, teacher)


def check_output_dir(cfg: Config) -> Path:
    """train.output_dir, created if needed; OSError naming the key unless it is a writable
    folder. Runs before any data or model work."""
    run_dir = Path(cfg.train.output_dir)
    where = f"train.output_dir {str(run_dir)!r}"
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"{where} is a file, not a folder; choose another "
                                 "train.output_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=run_dir).close()
    except OSError as err:
        reason = err.strerror or str(err)
        raise OSError(err.errno, f"{where} cannot be created or written to ({reason}); "
                                 "choose another train.output_dir") from err
    return run_dir


# Keys a resumed run may change: they do not change what is computed (or, data.path, the
# dataset fingerprint checks). data.batch_size is compared as the global batch.
RESUMABLE = {"train.output_dir", "train.resume", "train.progress", "train.device",
             "train.max_steps", "train.log_interval", "train.checkpoint_interval",
             "train.stop_check_interval", "train.max_bad_steps", "train.eval_interval",
             "data.path", "data.num_workers", "data.eval_batch_size", "data.batch_size"}


def check_resume_config(cfg: Config, state: dict[str, Any], world_size: int, source: str
                        ) -> None:
    """ValueError naming every key whose value differs from the checkpoint's run."""
    saved, now = state.get("config") or {}, to_dict(cfg)
    differing = [
        f"{section}.{key}: {saved[section][key]!r} in the checkpoint, {value!r} now"
        for section, values in now.items() for key, value in values.items()
        if f"{section}.{key}" not in RESUMABLE and key in saved.get(section, {})
        and saved[section][key] != value]
    if saved.get("data") and "world_size" in state:
        then = saved["data"]["batch_size"] * state["world_size"]
        if then != cfg.data.batch_size * world_size:
            differing.append(f"global batch (data.batch_size x ranks): {then} in the "
                             f"checkpoint, {cfg.data.batch_size * world_size} now")
    if differing:
        longer = any(d.startswith("train.epochs:") for d in differing)
        raise ValueError(f"{source} was written by a run with another config: "
                         f"{'; '.join(differing)}. Resume with the checkpoint's settings "
                         "(its config.yaml), or start afresh with another train.output_dir "
                         "or train.resume=false" + (
                             f"; to train its weights further, start a new run from them: "
                             f"model.init_checkpoint={source} and another train.output_dir "
                             "(a run's schedule is fixed by its train.epochs)" if longer else ""))


def resume_state(cfg: Config, run_dir: Path, world_size: int) -> dict[str, Any] | None:
    """The checkpoint this run continues from (checked against the config), or None."""
    last = run_dir / "checkpoints" / "last.pt"
    if not (cfg.train.resume and last.is_file()):
        return None
    state = checkpoint.load(last)
    check_resume_config(cfg, state, world_size, str(last))
    return state


def train(cfg: Config) -> dict[str, Any]:
    """Train as configured, on one process or every rank torchrun starts; resumes from
    output_dir/checkpoints/last.pt when it exists; SIGTERM, SIGUSR1 and a first Ctrl-C
    checkpoint and stop."""
    dist = distributed.setup(resolve_device(cfg.train.device))
    try:
        with distributed.StopRequest() as stop:
            return _train(cfg, dist, stop)
    finally:
        distributed.teardown(dist)


def _train(cfg: Config, dist: distributed.Distributed,
           stop: distributed.StopRequest) -> dict[str, Any]:
    device = dist.device
    run_dir = check_output_dir(cfg)
    state = resume_state(cfg, run_dir, dist.world_size)
    torch.manual_seed(cfg.train.seed)
    index, train_loader, val_loader, mixup = build_data(cfg, device, dist.rank, dist.world_size)
    num_classes = cfg.model.num_classes or len(index.classes)
    if num_classes != len(index.classes):
        raise ValueError(f"model.num_classes={num_classes} but the dataset has "
                         f"{len(index.classes)} classes")
    model = build_model(cfg, num_classes, device, index.classes)
    criterion = build_criterion(cfg)
    if dist.active:
        torch.manual_seed(cfg.train.seed + dist.rank)  # drop-path masks differ between ranks
    if dist.is_main and state is None:
        save_config(cfg, run_dir / "config.yaml")
    trainer = Trainer(cfg, model, train_loader, val_loader, criterion, mixup, device, run_dir,
                      fingerprint=index.fingerprint,
                      teacher_targets=build_teacher_targets(cfg, num_classes, device),
                      dist=dist, stop=stop, classes=index.classes)
    try:
        if state is not None:
            trainer.resume(state)
            last = run_dir / "checkpoints" / "last.pt"
            if trainer.epoch >= cfg.train.epochs:
                if dist.is_main:
                    print(f"deit-fast train: the run in {run_dir} is complete ({trainer.epoch} "
                          f"of {cfg.train.epochs} epochs, step {trainer.global_step}): nothing "
                          "left to train. To train its weights further, start a new run from "
                          f"them: model.init_checkpoint={last} and another train.output_dir",
                          file=sys.stderr)
                return trainer.summary()
            if dist.is_main:
                print(f"deit-fast train: resuming from {last} at step {trainer.global_step} "
                      f"(epoch {trainer.epoch + 1} of {cfg.train.epochs})", file=sys.stderr)
        return trainer.fit()
    finally:
        trainer.close()
