"""The training loop: where each step is, checkpoints, logs and evaluation around
step.TrainStep, which computes the steps.

Nothing here waits for the device but the log intervals' one read. Under DDP every rank
runs the same loop; rank 0 alone writes and speaks. Checkpoints hold everything needed to
continue exactly (weights, optimizer, scaler, EMA, schedule and data positions, every
rank's RNG, the unreadable files met, the last evaluation). A step is one loader batch;
an update is train.accum_steps of them (fewer at an epoch's end), and the lr schedule
counts updates. Stops, checkpoints and max_steps wait for an update's end; under torchrun
the ranks agree on a stop (SIGTERM, SIGUSR1, Ctrl-C) every train.stop_check_interval
steps and at epoch ends. A resumed run's metrics continue from its checkpoint's step.
Epochs are numbered from 1 in all a run writes and says (`self.epoch` counts finished ones).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from deit_fast import checkpoint
from deit_fast.config import Config, to_dict
from deit_fast.data_pipeline.files import remove_temporaries
from deit_fast.data_pipeline.mixup import Mixup
from deit_fast.distributed import Distributed, StopRequest
from deit_fast.evaluate import evaluate
from deit_fast.flops import mfu, peak_tflops, train_flops_per_image
from deit_fast.metrics import RunLog, Window
from deit_fast.optim import CosineSchedule, scaled_lr, warn_if_warmup_covers
from deit_fast.step import BadSteps, BadStepsError, TrainStep
from deit_fast.teacher import TeacherTargets

__all__ = ["BadStepsError", "BatchSource", "Trainer"]


class BatchSource(Protocol):
    """What the Trainer reads batches from (data_pipeline's loaders, or tests' in-memory
    ones): batches with images and labels (and a teacher cache's top-k)."""

    steps_per_epoch: int
    items_per_step: int  # samples of a global step: the per-rank batch x the ranks
    bad_files: set[str]  # unreadable files skipped so far

    def epoch(self, epoch: int, start_step: int = 0,
              start_item: int | None = None) -> Iterable[Any]: ...


class Trainer:
    def __init__(self, cfg: Config, model: nn.Module, train_loader: BatchSource,
                 val_loader: Iterable[tuple[Tensor, Tensor]] | None,
                 criterion: Callable[..., Tensor], mix: Mixup,
                 device: torch.device, run_dir: str | Path, fingerprint: str = "",
                 teacher_targets: TeacherTargets | None = None,
                 dist: Distributed | None = None, stop: StopRequest | None = None,
                 classes: list[str] | None = None) -> None:
        t = cfg.train
        self.cfg, self.device, self.run_dir = cfg, device, Path(run_dir)
        self.model, self.train_loader, self.val_loader = model, train_loader, val_loader
        self.fingerprint, self.classes, self.stop = fingerprint, classes, stop
        self.dist = dist or Distributed(device=device)
        self.items_per_step = train_loader.items_per_step  # a global step's, all ranks
        self.accum_steps = t.accum_steps
        updates = self.updates_per_epoch = math.ceil(train_loader.steps_per_epoch / t.accum_steps)
        self.schedule = CosineSchedule(
            scaled_lr(cfg.optim, self.items_per_step * t.accum_steps), cfg.optim.min_lr,
            cfg.optim.warmup_lr, round(cfg.optim.warmup_epochs * updates), t.epochs * updates)
        if self.dist.is_main:
            planned = min(t.epochs * updates, (t.max_steps or math.inf) // t.accum_steps)
            warn_if_warmup_covers(self.schedule, planned, cfg.optim.warmup_epochs, t.epochs,
                                  t.max_steps)
        self.step = TrainStep(cfg, model, mix, criterion, teacher_targets, device,
                              self.dist.active)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.bad = BadSteps(device, t.max_bad_steps, str(self.ckpt_dir / "last.pt"))
        self.last_lr = self.schedule(0)
        self.updated = False  # whether the last train_step ended with an update
        self.epoch, self.step_in_epoch, self.item_in_epoch, self.global_step = 0, 0, 0, 0
        self.update_step = 0  # global_step at the end of the last update
        self.flops_per_image = train_flops_per_image(model)
        self.peak_tflops = peak_tflops(device, t.peak_tflops)
        self.best_top1 = -1.0
        self.last_eval: dict[str, float] = {}
        self.stopped = False
        self.resumed_bad_files: set[str] = set()  # met before the checkpoint this run resumed
        self.log: RunLog | None = None  # opened by fit(), at the step it starts from

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "format_version": checkpoint.FORMAT_VERSION,
            "model_name": self.cfg.model.name,
            "fingerprint": self.fingerprint,
            "classes": self.classes,
            "config": to_dict(self.cfg),
            **self.step.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "item_in_epoch": self.item_in_epoch,
            "global_step": self.global_step,
            "world_size": self.dist.world_size,
            "best_top1": self.best_top1,
            "last_eval": self.last_eval,
            "bad_steps": int(self.bad.total.item()),
            "bad_files": sorted(set().union(*self.dist.gather(self.bad_files()))),
            "rng": self.dist.gather(checkpoint.rng_state()),
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        checkpoint.check_run(state, source, self.cfg.model.name, self.classes, self.fingerprint)
        self.step.load_state_dict(state)
        self.epoch, self.best_top1 = state["epoch"], state["best_top1"]
        self.last_eval = state.get("last_eval", {})
        # The data position is a global item count, so it survives a change of world size;
        # steps are re-derived in this run's units (a partial step rounds down).
        self.item_in_epoch = state.get("item_in_epoch",
                                       state["step_in_epoch"] * self.items_per_step)
        self.step_in_epoch = self.item_in_epoch // self.items_per_step
        self.global_step = self.epoch * self.train_loader.steps_per_epoch + self.step_in_epoch
        self.update_step = self.global_step  # checkpoints are written at update ends
        self.bad.total.fill_(state.get("bad_steps", 0))
        self.resumed_bad_files = set(state.get("bad_files", ()))
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rngs) == self.dist.world_size:
            checkpoint.set_rng_state(rngs[self.dist.rank])
        else:  # another world size: a fresh, reproducible stream per rank
            torch.manual_seed(hash((self.cfg.train.seed, self.dist.rank, self.global_step)))

    def bad_files(self) -> set[str]:
        """Unreadable files met in training and validation, over the whole run (this rank)."""
        return (self.resumed_bad_files | self.train_loader.bad_files
                | getattr(self.val_loader, "bad_files", set()))

    def save(self, name: str = "last.pt") -> None:
        """Rank 0 writes; a failed write raises on every rank, so no rank trains on alone."""
        state = self.state_dict()
        error: OSError | None = None
        if self.dist.is_main:
            try:
                checkpoint.save_atomic(state, self.ckpt_dir / name)
            except OSError as err:
                error = err
        if self.dist.any_rank(error is not None):
            raise error or OSError(f"rank 0 could not write checkpoint {name}; see its error")

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from `state`, the run's checkpoints/last.pt."""
        if self.dist.is_main:
            remove_temporaries(self.ckpt_dir)
        self.load_state_dict(state, source=str(self.ckpt_dir / "last.pt"))

    # ----------------------------------------------------------------- loop
    def train_step(self, batch: Any) -> tuple[Tensor, Tensor]:
        """One loader batch: its share of the update's gradients, and on the last batch of
        an update (every train.accum_steps-th, and the last of an epoch) the update itself,
        counted in self.bad. Returns the loss and 1.0 where the update was skipped (a
        non-finite loss or gradient), 0.0 on batches that only accumulate; reads nothing on
        the host."""
        in_group = self.step_in_epoch % self.accum_steps
        group_start = self.step_in_epoch - in_group
        group_size = min(self.accum_steps, self.train_loader.steps_per_epoch - group_start)
        self.updated = in_group == group_size - 1
        self.last_lr = self.schedule(self.epoch * self.updates_per_epoch
                                     + group_start // self.accum_steps)
        # each rank draws its own mixing, as timm's per-process Mixup does
        key = (self.epoch, self.step_in_epoch, self.dist.rank)
        loss, bad = self.step(batch, key, self.last_lr, in_group == 0, self.updated, group_size)
        if self.updated:  # a batch that only accumulated has no update to count
            self.bad.count(bad)
        return loss, bad

    def fit(self) -> dict[str, Any]:
        """Train to train.epochs (or train.max_steps, or a stop signal); returns the summary."""
        cfg = self.cfg.train
        steps = self.train_loader.steps_per_epoch
        self.log = RunLog(self.run_dir, cfg.epochs * steps, self.global_step, cfg.epochs,
                          cfg.progress, self.dist.is_main)
        window = Window(self.device)

        def finish() -> dict[str, Any]:
            """The last, partial log window and the curves, then the summary."""
            if window.steps:
                self.log_window(window)
            self.log.plot(self.global_step)
            return self.summary()

        while self.epoch < cfg.epochs:
            self.model.train()
            for batch in self.train_loader.epoch(self.epoch, self.step_in_epoch,
                                                 self.item_in_epoch):
                loss, bad = self.train_step(batch)
                window.add(loss, bad, self.epoch)
                self.step_in_epoch += 1
                self.item_in_epoch += self.items_per_step
                self.global_step += 1
                self.log.advance()
                if self.global_step % cfg.log_interval == 0:
                    self.log_window(window)
                if not self.updated:  # stops, checkpoints and max_steps wait for the
                    continue  # update's end: a checkpoint holds no accumulated gradients
                end_of_epoch = self.step_in_epoch >= steps
                since, self.update_step = self.update_step, self.global_step
                if self.stop_requested(end_of_epoch or
                                       self.reached(cfg.stop_check_interval, since)):
                    self.stop_on_signal()
                    return finish()
                if cfg.max_steps and self.global_step >= cfg.max_steps and not end_of_epoch:
                    self.save()
                    return finish()
                if cfg.checkpoint_interval and not end_of_epoch and \
                        self.reached(cfg.checkpoint_interval, since):
                    self.save()
            self.end_epoch()
            if cfg.max_steps and self.global_step >= cfg.max_steps:
                break
        return finish()

    def reached(self, interval: int, since: int) -> bool:
        """Whether the steps after `since`, the previous update end, reached a multiple of
        `interval`: every interval fires at an update end, whatever the epoch's length."""
        return self.global_step // interval > since // interval

    def stop_requested(self, agree: bool) -> bool:
        """At an update end: one process reads its own flag (no device sync). Ranks agree
        with a gloo all-reduce, a host barrier, only where `agree` (every
        train.stop_check_interval steps and at epoch ends), which every rank reaches
        together."""
        if not self.dist.active:
            return bool(self.stop)
        return self.dist.any_rank(bool(self.stop)) if agree else False

    def log_window(self, window: Window) -> None:
        """The record of the steps since the last one: the one host sync per interval."""
        if self.dist.active:
            torch_dist.all_reduce(window.sums)
        loss_sum, finite, bad_steps, worst = torch.stack(
            [*window.sums, self.bad.total, self.bad.worst]).tolist()
        self.bad.check(self.global_step, worst)
        img_per_s = window.steps * self.items_per_step / (time.perf_counter() - window.start)
        self.log.window({
            "epoch": window.epoch + 1, "step": self.global_step,
            "loss": loss_sum / finite if finite else float("nan"), "lr": self.last_lr,
            "img_per_s": img_per_s,
            "mfu": mfu(self.flops_per_image, img_per_s / self.dist.world_size,
                       self.peak_tflops),
            "bad_images": len(self.bad_files()), "bad_steps": int(bad_steps)})
        window.reset()

    def stop_on_signal(self) -> None:
        self.bad.check(self.global_step)
        self.save()
        self.stopped = True
        self.log.say(f"deit-fast train: stopped on request at step {self.global_step}; wrote "
                     f"{self.ckpt_dir / 'last.pt'}; run the same command to resume")

    def end_epoch(self) -> None:
        self.epoch, self.step_in_epoch, self.item_in_epoch = self.epoch + 1, 0, 0
        is_best = False
        interval = self.cfg.train.eval_interval
        if self.val_loader is not None and interval and (
                self.epoch % interval == 0 or self.epoch == self.cfg.train.epochs):
            self.last_eval = self.evaluate()
            top1 = max(self.last_eval["top1"], self.last_eval.get("ema_top1", -1.0))
            is_best = top1 > self.best_top1
            self.best_top1 = max(self.best_top1, top1)
            self.log.evaluation({"epoch": self.epoch, "step": self.global_step,
                                 **self.last_eval}, self.best_top1)
        self.bad.check(self.global_step)
        self.save()
        if is_best:
            self.save("best.pt")
        self.log.plot(self.global_step)

    def evaluate(self) -> dict[str, float]:
        step = self.step
        result = evaluate(step.eval_model, self.val_loader, self.device, step.autocast)
        if step.ema:
            ema = evaluate(step.eval_ema, self.val_loader, self.device, step.autocast)
            result.update({f"ema_{k}": v for k, v in ema.items()})
        return result

    def summary(self) -> dict[str, Any]:
        """What the run did: epochs finished (counted from 1, as the logs number them), steps,
        the last evaluation and the best top-1, unreadable images and skipped updates."""
        return {"epoch": self.epoch, "epochs": self.cfg.train.epochs,
                "global_step": self.global_step, "best_top1": self.best_top1,
                "bad_images": len(self.bad_files()), "bad_steps": int(self.bad.total.item()),
                "stopped": self.stopped, "complete": self.epoch >= self.cfg.train.epochs,
                **self.last_eval}

    def close(self) -> None:
        if self.log:
            self.log.close()

