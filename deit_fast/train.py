"""The training loop: one object that takes a model, a loader, a loss and a config.

The hot loop does not synchronise with the host: the loss is accumulated on the device
and read only at log intervals. Checkpoints hold everything needed to continue exactly
(model, optimizer, scaler, EMA, schedule position, data position, RNG).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from deit_fast import checkpoint
from deit_fast.config import Config, to_dict
from deit_fast.ema import ModelEma
from deit_fast.evaluate import evaluate
from deit_fast.metrics import MetricsLog, plot_curves
from deit_fast.optim import CosineSchedule, build_optimizer, scaled_lr

PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainLoader(Protocol):
    steps_per_epoch: int
    bad_images: int

    def epoch(self, epoch: int, start_step: int = 0) -> Iterable[Any]: ...


Mix = Callable[..., tuple[Tensor, Tensor, Tensor | None]]
# Per-sample teacher targets for a batch (e.g. looked up in a teacher cache), or None.
TeacherTargets = Callable[[Any], Tensor]


class Trainer:
    def __init__(self, cfg: Config, model: nn.Module, train_loader: TrainLoader,
                 val_loader: Iterable[tuple[Tensor, Tensor]] | None,
                 criterion: Callable[..., Tensor], mix: Mix,
                 device: torch.device, run_dir: str | Path, world_size: int = 1,
                 fingerprint: str = "", teacher_targets: TeacherTargets | None = None) -> None:
        self.cfg, self.device, self.run_dir = cfg, device, Path(run_dir)
        self.model, self.train_loader, self.val_loader = model, train_loader, val_loader
        self.criterion, self.mix, self.fingerprint = criterion, mix, fingerprint
        self.teacher_targets = teacher_targets
        steps = train_loader.steps_per_epoch
        lr = scaled_lr(cfg.optim, cfg.data.batch_size * world_size)
        self.schedule = CosineSchedule(lr, cfg.optim.min_lr, cfg.optim.warmup_lr,
                                       round(cfg.optim.warmup_epochs * steps),
                                       cfg.train.epochs * steps)
        self.optimizer = build_optimizer(model, cfg.optim, lr, device)
        self.dtype = PRECISION[cfg.train.precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema else None
        self.forward = torch.compile(model) if cfg.train.compile else model
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_top1 = -1.0
        self.last_eval: dict[str, float] = {}
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.metrics = MetricsLog(self.run_dir)

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
            "global_step": self.global_step,
            "best_top1": self.best_top1,
            "rng": checkpoint.rng_state(),
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
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best_top1 = state["global_step"], state["best_top1"]
        checkpoint.set_rng_state(state["rng"])

    def save(self, name: str = "last.pt") -> None:
        checkpoint.save_atomic(self.state_dict(), self.ckpt_dir / name)

    def maybe_resume(self) -> bool:
        last = self.ckpt_dir / "last.pt"
        if not (self.cfg.train.resume and last.is_file()):
            return False
        self.load_state_dict(checkpoint.load(last), source=str(last))
        return True

    # ----------------------------------------------------------------- loop
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self, batch: Any) -> Tensor:
        lr = self.schedule(self.global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        teacher = self.teacher_targets(batch) if self.teacher_targets else None
        # Labels and teacher targets are mixed with the same lambda and permutation.
        images, targets, teacher = self.mix(batch.images, batch.labels,
                                            key=(self.epoch, self.step_in_epoch), extra=teacher)
        with self.autocast():
            outputs = self.forward(images)
            loss = self.criterion(images, outputs, targets, teacher)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema:
            self.ema.update()
        return loss.detach()

    def fit(self) -> dict[str, Any]:
        """Train to train.epochs (or train.max_steps); returns the final summary."""
        cfg = self.cfg.train
        steps = self.train_loader.steps_per_epoch
        total = cfg.epochs * steps
        bar = tqdm(total=total, initial=self.global_step, disable=not cfg.progress,
                   desc="train", unit="step", dynamic_ncols=True)
        running = torch.zeros((), device=self.device)
        window_start, window_steps = time.perf_counter(), 0
        try:
            while self.epoch < cfg.epochs:
                self.model.train()
                for batch in self.train_loader.epoch(self.epoch, self.step_in_epoch):
                    running += self.train_step(batch)
                    self.step_in_epoch += 1
                    self.global_step += 1
                    window_steps += 1
                    bar.update(1)
                    if self.global_step % cfg.log_interval == 0:
                        elapsed = time.perf_counter() - window_start
                        loss = (running / window_steps).item()  # the one sync per interval
                        record = {"epoch": self.epoch, "step": self.global_step, "loss": loss,
                                  "lr": self.optimizer.param_groups[0]["lr"],
                                  "img_per_s": window_steps * self.cfg.data.batch_size / elapsed,
                                  "bad_images": self.train_loader.bad_images}
                        self.metrics.log(record)
                        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}")
                        running.zero_()
                        window_start, window_steps = time.perf_counter(), 0
                    end_of_epoch = self.step_in_epoch >= steps
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

    def end_epoch(self) -> None:
        finished = self.epoch
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        is_best = False
        if self.val_loader is not None and (self.epoch % self.cfg.train.eval_interval == 0
                                            or self.epoch == self.cfg.train.epochs):
            self.last_eval = self.evaluate()
            self.metrics.log({"epoch": finished, "step": self.global_step, **self.last_eval})
            top1 = max(self.last_eval["top1"], self.last_eval.get("ema_top1", -1.0))
            is_best = top1 > self.best_top1
            self.best_top1 = max(self.best_top1, top1)
        self.save()
        if is_best:
            self.save("best.pt")
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
                **self.last_eval}

    def close(self) -> None:
        self.metrics.close()
