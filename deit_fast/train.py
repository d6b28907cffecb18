"""The training loop: one object that takes a model, a loader, a loss and a config.

The hot loop does not synchronise with the host: the loss and the bad-step counters stay
on the device and are read only at log intervals. Under DDP every rank runs the same
loop; only rank 0 writes logs, metrics, plots and checkpoints. Checkpoints hold
everything needed to continue exactly (model, optimizer, scaler, EMA, schedule position,
data position as a global item count, every rank's RNG).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from tqdm import tqdm

from deit_fast import checkpoint
from deit_fast.config import Config, to_dict
from deit_fast.distributed import Distributed, StopRequest
from deit_fast.ema import ModelEma
from deit_fast.evaluate import evaluate
from deit_fast.metrics import MetricsLog, plot_curves
from deit_fast.optim import CosineSchedule, build_optimizer, scaled_lr
from deit_fast.teacher import TeacherTargets

PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainLoader(Protocol):
    steps_per_epoch: int
    bad_images: int

    def epoch(self, epoch: int, start_step: int = 0,
              start_item: int | None = None) -> Iterable[Any]: ...


Mix = Callable[..., tuple[Tensor, Tensor, Tensor | None]]


class BadStepsError(RuntimeError):
    """The loss stayed NaN or inf for train.max_bad_steps steps in a row."""


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP writing gradients straight into its buckets; DeiT runs the same graph every step
    (drop path scales, never skips), and static_graph also covers an unused distillation head."""
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True, static_graph=True)


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
        self.items_per_step = cfg.data.batch_size * self.dist.world_size
        steps = train_loader.steps_per_epoch
        lr = scaled_lr(cfg.optim, self.items_per_step)
        self.schedule = CosineSchedule(lr, cfg.optim.min_lr, cfg.optim.warmup_lr,
                                       round(cfg.optim.warmup_epochs * steps),
                                       cfg.train.epochs * steps)
        self.optimizer = build_optimizer(model, cfg.optim, lr, device)
        self.dtype = PRECISION[cfg.train.precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        # DDP broadcasts rank 0's weights; the EMA copies them after that, from the bare module.
        trained = wrap_ddp(model, device) if self.dist.active else model
        self.ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema else None
        # compile outside DDP, so DDP's bucketing sees the compiled graph's gradients
        self.forward = torch.compile(trained) if cfg.train.compile else trained
        self.epoch, self.step_in_epoch, self.item_in_epoch, self.global_step = 0, 0, 0, 0
        self.best_top1 = -1.0
        self.last_eval: dict[str, float] = {}
        self.stopped = False
        self.bad_steps = torch.zeros((), device=device)  # all skipped steps of the run
        self.bad_streak = torch.zeros((), device=device)  # consecutive skipped steps now
        self.worst_streak = torch.zeros((), device=device)  # longest streak since last check
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.metrics = MetricsLog(self.run_dir) if self.dist.is_main else None

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
        self.bad_steps.fill_(state.get("bad_steps", 0))
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rngs) == self.dist.world_size:
            checkpoint.set_rng_state(rngs[self.dist.rank])
        else:  # another world size: a fresh, reproducible stream per rank
            torch.manual_seed(hash((self.cfg.train.seed, self.dist.rank, self.global_step)))

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

    def maybe_resume(self) -> bool:
        last = self.ckpt_dir / "last.pt"
        if not (self.cfg.train.resume and last.is_file()):
            return False
        if self.dist.is_main:
            checkpoint.remove_stale_temporaries(self.ckpt_dir)
        self.load_state_dict(checkpoint.load(last), source=str(last))
        return True

    # ----------------------------------------------------------------- loop
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self, batch: Any) -> tuple[Tensor, Tensor]:
        """One update; returns the loss and 1.0 where the step was skipped (non-finite loss)."""
        lr = self.schedule(self.global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        teacher = self.teacher_targets.from_batch(batch) if self.teacher_targets else None
        # Labels and cached teacher targets are mixed with the same lambda and permutation;
        # each rank draws its own, as timm's per-process Mixup does.
        key = (self.epoch, self.step_in_epoch, self.dist.rank)
        images, targets, teacher = self.mix(batch.images, batch.labels, key=key, extra=teacher)
        with self.autocast():
            outputs = self.forward(images)
            if self.teacher_targets:  # online: the teacher sees the mixed images
                teacher = self.teacher_targets(images, teacher)
            loss = self.criterion(outputs, targets, teacher)
        # Skipping a non-finite step without a host sync: the flag stays on the device, is
        # max-reduced over ranks, and gates the update inside the optimizer (fused AdamW's
        # found_inf, or GradScaler in fp16, which also lowers its scale); the NaN factor makes
        # every gradient non-finite so GradScaler sees it even when the loss alone was bad.
        bad = (~torch.isfinite(loss.detach())).float()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss * torch.where(bad > 0, float("nan"), 1.0)).backward()
        if self.dist.active:
            torch_dist.all_reduce(bad, op=torch_dist.ReduceOp.MAX)  # every rank skips alike
        if self.cfg.optim.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.optimizer_step(bad)
        if self.ema:
            self.ema.update(1.0 - bad)
        return loss.detach(), bad

    def optimizer_step(self, bad: Tensor) -> None:
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = bad  # the fused kernel leaves params and state alone
            self.optimizer.step()
            del self.optimizer.found_inf
        elif not bad.item():  # foreach AdamW runs on the CPU, where .item() stalls nothing
            self.optimizer.step()

    def fit(self) -> dict[str, Any]:
        """Train to train.epochs (or train.max_steps, or a stop signal); returns the summary."""
        cfg = self.cfg.train
        steps = self.train_loader.steps_per_epoch
        bar = tqdm(total=cfg.epochs * steps, initial=self.global_step, desc="train",
                   disable=not (cfg.progress and self.dist.is_main), unit="step",
                   dynamic_ncols=True)
        running = torch.zeros(2, device=self.device)  # loss sum over finite steps, their count
        window_start, window_steps = time.perf_counter(), 0
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
                    end_of_epoch = self.step_in_epoch >= steps
                    if self.dist.any_rank(bool(self.stop)):
                        return self.stop_on_signal()
                    if cfg.checkpoint_interval and not end_of_epoch and \
                            self.global_step % cfg.checkpoint_interval == 0:
                        self.save()
                    if cfg.max_steps and self.global_step >= cfg.max_steps and not end_of_epoch:
                        self.save()
                        return self.summary()
                self.end_epoch()
                if cfg.max_steps and self.global_step >= cfg.max_steps:
                    break
        finally:
            bar.close()
        return self.summary()

    def count_bad(self, bad: Tensor) -> None:
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
        record = {"epoch": self.epoch, "step": self.global_step, "loss": loss,
                  "lr": self.optimizer.param_groups[0]["lr"],
                  "img_per_s": steps * self.items_per_step / elapsed,
                  "bad_images": self.train_loader.bad_images, "bad_steps": int(bad_steps)}
        self.metrics.log(record)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}")

    def stop_on_signal(self) -> dict[str, Any]:
        self.check_bad_steps(self.worst_streak.item())
        self.save()
        self.stopped = True
        if self.dist.is_main:
            print(f"deit-fast train: stopped on request at step {self.global_step}; wrote "
                  f"{self.ckpt_dir / 'last.pt'}; run the same command to resume",
                  file=sys.stderr, flush=True)
        return self.summary()

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
        if self.metrics:
            plot_curves(self.metrics.path, self.run_dir / "curves.png")

    def evaluate(self) -> dict[str, float]:
        result = evaluate(self.model, self.val_loader, self.device, self.autocast)
        if self.ema:
            ema = evaluate(self.ema.module, self.val_loader, self.device, self.autocast)
            result.update({f"ema_{k}": v for k, v in ema.items()})
        return result

    def summary(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "global_step": self.global_step,
                "best_top1": self.best_top1, "bad_images": self.train_loader.bad_images,
                "bad_steps": int(self.bad_steps.item()), "stopped": self.stopped,
                **self.last_eval}

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()
