"""The training loop: one object that takes a model, a loader, a loss and a config.

The hot loop does not synchronise with the host: the loss and the bad-step counters stay
on the device and are read only at log intervals, and the step itself (lr, mixing, the
non-finite guard, AdamW, EMA) reads nothing on the host. Under DDP every rank runs the same
loop; only rank 0 writes logs, metrics, plots and checkpoints. Checkpoints hold
everything needed to continue exactly (model, optimizer, scaler, EMA, schedule position,
data position as a global item count, every rank's RNG, the unreadable files met so far).

A stop request (SIGTERM, SIGUSR1, Ctrl-C) is honoured after the step it arrives in; under
torchrun the ranks agree on it every train.stop_check_interval steps and at epoch ends,
so the stop comes up to that many steps later. A resumed run's metrics continue from the
checkpoint's step: later records of the interrupted run are dropped, never repeated.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from tqdm import tqdm

from deit_fast import checkpoint
from deit_fast.config import Config, TrainConfig, to_dict
from deit_fast.distributed import Distributed, StopRequest
from deit_fast.ema import ModelEma
from deit_fast.evaluate import evaluate
from deit_fast.flops import mfu, peak_tflops, train_flops_per_image
from deit_fast.metrics import MetricsLog, plot_curves, warn_write_failed
from deit_fast.optim import CosineSchedule, build_optimizer, scaled_lr
from deit_fast.step_graph import CapturedStep
from deit_fast.teacher import TeacherTargets

PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainLoader(Protocol):
    steps_per_epoch: int
    bad_files: set[str]  # unreadable files skipped so far

    def epoch(self, epoch: int, start_step: int = 0,
              start_item: int | None = None) -> Iterable[Any]: ...


Mix = Callable[..., tuple[Tensor, Tensor, Tensor | None]]


class BadStepsError(RuntimeError):
    """The loss stayed NaN or inf for train.max_bad_steps steps in a row."""


def compile_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """train.compile and train.compile_fullgraph, for the training and the evaluation model."""
    if cfg.compile == "none":
        return model
    return torch.compile(model, mode=None if cfg.compile == "default" else cfg.compile,
                         fullgraph=cfg.compile_fullgraph)


def wrap_ddp(model: nn.Module, device: torch.device, accumulate: bool = False) -> nn.Module:
    """DDP writing gradients straight into its buckets; DeiT runs the same graph every step
    (drop path scales, never skips), and static_graph also covers an unused distillation head.
    Accumulation needs no_sync, which static_graph breaks in torch 2.14 (an internal assert,
    pytorch/pytorch#187732): there, unused parameters are found each step instead."""
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True, static_graph=not accumulate,
        find_unused_parameters=accumulate)


class Trainer:
    def __init__(self, cfg: Config, model: nn.Module, train_loader: TrainLoader,
                 val_loader: Iterable[tuple[Tensor, Tensor]] | None,
                 criterion: Callable[..., Tensor], mix: Mix,
                 device: torch.device, run_dir: str | Path, fingerprint: str = "",
                 teacher_targets: TeacherTargets | None = None,
                 dist: Distributed | None = None, stop: StopRequest | None = None) -> None:
        self.cfg, self.device, self.run_dir = cfg, device, Path(run_dir)
        self.model, self.train_loader, self.val_loader = model, train_loader, val_loader
        self.criterion, self.mix, self.fingerprint = criterion, mix, fingerprint
        self.teacher_targets, self.stop = teacher_targets, stop
        self.dist = dist or Distributed(device=device)
        # A step is one loader batch (a micro-batch); an update is train.accum_steps of them,
        # fewer at the end of an epoch. The lr and its schedule count updates.
        self.items_per_step = cfg.data.batch_size * self.dist.world_size
        self.accum_steps = cfg.train.accum_steps
        updates = math.ceil(train_loader.steps_per_epoch / self.accum_steps)
        self.updates_per_epoch = updates
        lr = scaled_lr(cfg.optim, self.items_per_step * self.accum_steps)
        self.schedule = CosineSchedule(lr, cfg.optim.min_lr, cfg.optim.warmup_lr,
                                       round(cfg.optim.warmup_epochs * updates),
                                       cfg.train.epochs * updates)
        all_updates = cfg.train.epochs * updates
        run_updates = min(all_updates, (cfg.train.max_steps or all_updates * self.accum_steps)
                          // self.accum_steps)
        if self.dist.is_main and self.schedule.warmup_steps >= run_updates > 0 and \
                cfg.optim.warmup_epochs > 0:
            warnings.warn(f"optim.warmup_epochs={cfg.optim.warmup_epochs:g} is as long as the "
                          f"whole run ({run_updates} updates of train.epochs={cfg.train.epochs}, "
                          f"train.max_steps={cfg.train.max_steps}): the learning rate never "
                          "reaches optim.lr; lower optim.warmup_epochs", stacklevel=2)
        self.optimizer = build_optimizer(model, cfg.optim, lr, device,
                                         capturable=cfg.train.cuda_graphs)
        self.lr = torch.zeros((), device=device)  # every group's lr, filled from the schedule
        self.last_lr = self.schedule(0)
        self.dtype = PRECISION[cfg.train.precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.found_inf = torch.zeros((), device=device)
        self.unit = torch.ones((), device=device)
        self.updated = False  # whether the last train_step ended with an update
        self.update_step = 0  # global_step at the end of the last update
        # DDP broadcasts rank 0's weights; the EMA copies them after that, from the bare module.
        self.ddp = wrap_ddp(model, device, self.accum_steps > 1) if self.dist.active else None
        self.ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema else None
        # compile outside DDP, so DDP's bucketing sees the compiled graph's gradients
        self.forward = compile_model(self.ddp or model, cfg.train)
        self.eval_model = compile_model(model, cfg.train) if self.ddp else self.forward
        self.eval_ema = compile_model(self.ema.module, cfg.train) if self.ema else None
        self.captured = CapturedStep(self, device) if cfg.train.cuda_graphs else None
        self.flops_per_image = train_flops_per_image(model)
        self.peak_tflops = peak_tflops(device, cfg.train.peak_tflops)
        self.epoch, self.step_in_epoch, self.item_in_epoch, self.global_step = 0, 0, 0, 0
        self.best_top1 = -1.0
        self.last_eval: dict[str, float] = {}
        self.stopped = False
        self.bad_steps = torch.zeros((), device=device)  # all skipped steps of the run
        self.bad_streak = torch.zeros((), device=device)  # consecutive skipped steps now
        self.worst_streak = torch.zeros((), device=device)  # longest streak since last check
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.resumed_bad_files: set[str] = set()  # met before the checkpoint this run resumed
        self.metrics: MetricsLog | None = None  # opened by fit(), at the step it starts from
        self.plotted_step = -1

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "format_version": checkpoint.FORMAT_VERSION,
            "model_name": self.cfg.model.name,
            "fingerprint": self.fingerprint,
            "config": to_dict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "item_in_epoch": self.item_in_epoch,
            "global_step": self.global_step,
            "world_size": self.dist.world_size,
            "best_top1": self.best_top1,
            "bad_steps": int(self.bad_steps.item()),
            "bad_files": sorted(set().union(*self.dist.gather(self.bad_files()))),
            "rng": self.dist.gather(checkpoint.rng_state()),
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        if state.get("model_name") != self.cfg.model.name:
            raise ValueError(f"{source} was written for model {state.get('model_name')!r}, "
                             f"this run's model.name is {self.cfg.model.name!r}")
        if self.fingerprint and state.get("fingerprint") not in ("", self.fingerprint):
            raise ValueError(f"{source} was written for another dataset (fingerprint "
                             f"{state.get('fingerprint')!r}, this run's {self.fingerprint!r})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.best_top1 = state["epoch"], state["best_top1"]
        # The data position is a global item count, so it survives a change of world size;
        # steps are re-derived in this run's units (a partial step rounds down).
        self.item_in_epoch = state.get("item_in_epoch",
                                       state["step_in_epoch"] * self.items_per_step)
        self.step_in_epoch = self.item_in_epoch // self.items_per_step
        self.global_step = self.epoch * self.train_loader.steps_per_epoch + self.step_in_epoch
        self.update_step = self.global_step  # checkpoints are written at update ends
        self.bad_steps.fill_(state.get("bad_steps", 0))
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
            checkpoint.remove_stale_temporaries(self.ckpt_dir)
        self.load_state_dict(state, source=str(self.ckpt_dir / "last.pt"))

    # ----------------------------------------------------------------- loop
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self, batch: Any) -> tuple[Tensor, Tensor]:
        """One loader batch: forward and backward, and on the last micro-batch of an update
        (every train.accum_steps-th, and the last of an epoch) the update itself. Returns the
        loss and 1.0 where the update was skipped (a non-finite loss or gradient), 0.0 on
        micro-batches that only accumulate. Nothing here reads a device value on the host."""
        in_group = self.step_in_epoch % self.accum_steps
        group_start = self.step_in_epoch - in_group
        group_size = min(self.accum_steps, self.train_loader.steps_per_epoch - group_start)
        self.updated = in_group == group_size - 1
        self.last_lr = self.schedule(self.epoch * self.updates_per_epoch
                                     + group_start // self.accum_steps)
        self.lr.fill_(self.last_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        # each rank draws its own mixing, as timm's per-process Mixup does
        key = (self.epoch, self.step_in_epoch, self.dist.rank)
        if self.captured is not None:
            images = batch.images
            params = self.mix.params(key, images.shape[-2], images.shape[-1], len(images))
            return self.captured(batch, *params)
        if in_group == 0:
            self.optimizer.zero_grad(set_to_none=True)
        perm, weights = self.mix.device_params(key, batch.images)
        sync = self.updated or self.ddp is None
        with contextlib.nullcontext() if sync else self.ddp.no_sync():
            loss = self.forward_backward(batch, perm, weights, group_size)
        if not self.updated:
            return loss, torch.zeros_like(self.found_inf)
        return loss, self.update()

    def forward_backward(self, batch: Any, perm: Tensor, weights: Tensor,
                         group_size: int = 1) -> Tensor:
        """Mixes the batch by the draw (perm, weights), adds this micro-batch's share of the
        update's mean-loss gradients and returns its loss. A non-finite loss turns every
        gradient NaN (the update then sees it, on every rank once DDP has reduced them, and
        GradScaler in fp16 too)."""
        images, targets = self.mix.apply(batch.images, batch.labels, perm, weights)
        with self.autocast():
            outputs = self.forward(images)
            teacher = self.teacher_targets(batch, images, perm, weights) \
                if self.teacher_targets else None
            loss = self.criterion(outputs, targets, teacher)
        share = torch.where(torch.isfinite(loss.detach()), 1.0 / group_size, float("nan"))
        self.scaler.scale(loss * share).backward()
        return loss.detach()

    def update(self) -> Tensor:
        """Clip, AdamW and EMA; an update with a non-finite gradient is skipped on the
        device (found-inf from the gradients themselves: under bf16 a finite loss can still
        give inf gradients). Returns that flag, 1.0 for a skipped update."""
        self.scaler.unscale_(self.optimizer)  # fp16: back to true gradients; else a no-op
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        bad = self.found_inf
        bad.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(grads, bad, self.unit)
        if self.cfg.optim.clip_grad is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.optimizer_step(bad)
        if self.ema:
            self.ema.update(1.0 - bad)
        return bad.clone()

    def optimizer_step(self, bad: Tensor) -> None:
        """Fused AdamW leaves weights, moments and step counts alone where found_inf is set."""
        if self.scaler.is_enabled():  # it hands the kernel its own found_inf and lowers the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.found_inf = bad
            self.optimizer.step()
            del self.optimizer.found_inf

    def fit(self) -> dict[str, Any]:
        """Train to train.epochs (or train.max_steps, or a stop signal); returns the summary."""
        cfg = self.cfg.train
        steps = self.train_loader.steps_per_epoch
        bar = tqdm(total=cfg.epochs * steps, initial=self.global_step, desc="train",
                   disable=not (cfg.progress and self.dist.is_main), unit="step",
                   dynamic_ncols=True)
        if self.dist.is_main:
            self.metrics = MetricsLog(self.run_dir, start_step=self.global_step)
        running = torch.zeros(2, device=self.device)  # loss sum over finite steps, their count
        window_start, window_steps = time.perf_counter(), 0

        def finish() -> dict[str, Any]:
            """The last, partial log window and the curves, then the summary."""
            if window_steps:
                self.log_window(running, window_steps, time.perf_counter() - window_start, bar)
            self.plot()
            return self.summary()

        try:
            while self.epoch < cfg.epochs:
                self.model.train()
                for batch in self.train_loader.epoch(self.epoch, self.step_in_epoch,
                                                     self.item_in_epoch):
                    loss, bad = self.train_step(batch)
                    running += torch.stack([torch.where(bad > 0, 0.0, loss), 1.0 - bad])
                    self.count_bad(bad)
                    self.step_in_epoch += 1
                    self.item_in_epoch += self.items_per_step
                    self.global_step += 1
                    window_steps += 1
                    bar.update(1)
                    if self.global_step % cfg.log_interval == 0:
                        self.log_window(running, window_steps, time.perf_counter() - window_start,
                                        bar)
                        running.zero_()
                        window_start, window_steps = time.perf_counter(), 0
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
        finally:
            bar.close()

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

    def count_bad(self, bad: Tensor) -> None:
        if not self.updated:  # a micro-batch that only accumulated: no update to count
            return
        self.bad_steps += bad
        self.bad_streak.mul_(bad).add_(bad)  # (streak + 1) on a bad step, 0 on a good one
        torch.maximum(self.worst_streak, self.bad_streak, out=self.worst_streak)

    def check_bad_steps(self, worst: float) -> None:
        limit = self.cfg.train.max_bad_steps
        if worst >= limit:
            raise BadStepsError(
                f"the loss was NaN or inf for {int(worst)} steps in a row (train.max_bad_steps="
                f"{limit}), last at step {self.global_step}; those updates were skipped, and "
                f"{self.ckpt_dir / 'last.pt'} holds the last checkpoint. Try a lower optim.lr, "
                "optim.clip_grad, or train.precision=bf16")
        self.worst_streak.zero_()

    def log_window(self, running: Tensor, steps: int, elapsed: float, bar: tqdm) -> None:
        if self.dist.active:
            torch_dist.all_reduce(running)
        loss_sum, finite, bad_steps, worst = torch.stack(
            [*running, self.bad_steps, self.worst_streak]).tolist()  # the one sync per interval
        self.check_bad_steps(worst)
        if not self.dist.is_main:
            return
        loss = loss_sum / finite if finite else float("nan")
        img_per_s = steps * self.items_per_step / elapsed
        record = {"epoch": self.epoch, "step": self.global_step, "loss": loss,
                  "lr": self.last_lr, "img_per_s": img_per_s,
                  "mfu": mfu(self.flops_per_image, img_per_s / self.dist.world_size,
                             self.peak_tflops),
                  "bad_images": len(self.bad_files()), "bad_steps": int(bad_steps)}
        self.metrics.log(record)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{img_per_s:.0f}")

    def stop_on_signal(self) -> None:
        self.check_bad_steps(self.worst_streak.item())
        self.save()
        self.stopped = True
        if self.dist.is_main:
            print(f"deit-fast train: stopped on request at step {self.global_step}; wrote "
                  f"{self.ckpt_dir / 'last.pt'}; run the same command to resume",
                  file=sys.stderr, flush=True)

    def end_epoch(self) -> None:
        finished = self.epoch
        self.epoch, self.step_in_epoch, self.item_in_epoch = self.epoch + 1, 0, 0
        is_best = False
        if self.val_loader is not None and (self.epoch % self.cfg.train.eval_interval == 0
                                            or self.epoch == self.cfg.train.epochs):
            self.last_eval = self.evaluate()
            if self.metrics:
                self.metrics.log({"epoch": finished, "step": self.global_step, **self.last_eval})
            top1 = max(self.last_eval["top1"], self.last_eval.get("ema_top1", -1.0))
            is_best = top1 > self.best_top1
            self.best_top1 = max(self.best_top1, top1)
        self.check_bad_steps(self.worst_streak.item())
        self.save()
        if is_best:
            self.save("best.pt")
        self.plot()

    def plot(self) -> None:
        """curves.png from metrics.jsonl (rank 0); a failed write warns and training goes on."""
        if self.metrics and self.plotted_step != self.global_step:
            try:
                plot_curves(self.metrics.path, self.run_dir / "curves.png")
            except OSError as err:
                warn_write_failed(err)
            self.plotted_step = self.global_step

    def evaluate(self) -> dict[str, float]:
        result = evaluate(self.eval_model, self.val_loader, self.device, self.autocast)
        if self.ema:
            ema = evaluate(self.eval_ema, self.val_loader, self.device, self.autocast)
            result.update({f"ema_{k}": v for k, v in ema.items()})
        return result

    def summary(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "global_step": self.global_step,
                "best_top1": self.best_top1, "bad_images": len(self.bad_files()),
                "bad_steps": int(self.bad_steps.item()), "stopped": self.stopped,
                **self.last_eval}

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()
