"""The training step: mixing, forward and backward, and at an update's end the non-finite
guard, fused AdamW and the EMA.

`TrainStep` owns what a step computes with: the model and its DDP and compiled forms, the
optimizer and the one lr tensor it reads, the loss scaler, the EMA and, with
train.cuda_graphs, the captured update (step_graph.py), which replays this same code. The
Trainer says where a step is (its Mixup key, its lr, its place in an update); nothing here
reads a device value on the host: the lr is a device tensor filled from the schedule,
Mixup/CutMix blend with a per-pixel weight, and the non-finite guard takes its flag from
the gradients and hands it to AdamW and the EMA, which skip the update on the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from deit_fast.config import Config, TrainConfig
from deit_fast.data_pipeline.mixup import Mixup
from deit_fast.ema import ModelEma
from deit_fast.ops import PRECISION, autocast
from deit_fast.optim import build_optimizer
from deit_fast.step_graph import CapturedStep
from deit_fast.teacher import TeacherTargets


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


class TrainStep:
    """`step(batch, key, lr, starts, ends, group_size)` -> (loss, 1.0 where the update was
    skipped else 0.0), both device tensors; see the module docstring."""

    def __init__(self, cfg: Config, model: nn.Module, mix: Mixup,
                 criterion: Callable[..., Tensor], teacher_targets: TeacherTargets | None,
                 device: torch.device, distributed: bool = False) -> None:
        t = cfg.train
        self.cfg, self.model, self.mix, self.device = cfg, model, mix, device
        self.criterion, self.teacher_targets = criterion, teacher_targets
        self.precision = t.precision
        self.lr = torch.zeros((), device=device)  # every group's lr, filled from the schedule
        self.optimizer = build_optimizer(model, cfg.optim, self.lr, capturable=t.cuda_graphs)
        self.scaler = torch.amp.GradScaler(device.type,
                                           enabled=PRECISION[t.precision] == torch.float16)
        self.found_inf = torch.zeros((), device=device)
        self.unit = torch.ones((), device=device)
        # DDP broadcasts rank 0's weights; the EMA copies them after that, from the bare module
        self.ddp = wrap_ddp(model, device, t.accum_steps > 1) if distributed else None
        self.ema = ModelEma(model, t.ema_decay) if t.ema else None
        # compile outside DDP, so DDP's bucketing sees the compiled graph's gradients
        self.forward = compile_model(self.ddp or model, t)
        self.eval_model = compile_model(model, t) if self.ddp else self.forward
        self.eval_ema = compile_model(self.ema.module, t) if self.ema else None
        self.captured = self._captured() if t.cuda_graphs else None

    def _captured(self) -> CapturedStep:
        if self.device.type != "cuda":
            raise ValueError(f"train.cuda_graphs: needs a CUDA device, this run has {self.device}")
        if self.ddp is not None:
            raise ValueError("train.cuda_graphs: DDP's gradient all-reduce is not captured; "
                             "use it on one process (or turn train.cuda_graphs off)")
        if self.scaler.is_enabled() or self.cfg.train.accum_steps != 1:
            raise ValueError("train.cuda_graphs: needs train.precision bf16 or fp32 and "
                             "train.accum_steps=1")

        def whole_update(batch: Any, perm: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
            return self.forward_backward(batch, perm, weights), self.update()

        return CapturedStep(whole_update, lambda: self.optimizer.zero_grad(set_to_none=True),
                            self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def __call__(self, batch: Any, key: tuple[int, int, int], lr: float, starts: bool,
                 ends: bool, group_size: int) -> tuple[Tensor, Tensor]:
        """One loader batch mixed by the draw of `key` (epoch, step, rank): its share of the
        update's gradients; where it `ends` the update, the update itself."""
        self.lr.fill_(lr)
        if self.captured is not None:
            images = batch.images
            params = self.mix.params(key, images.shape[-2], images.shape[-1], len(images))
            return self.captured(batch, *params)
        if starts:
            self.optimizer.zero_grad(set_to_none=True)
        perm, weights = self.mix.device_params(key, batch.images)
        sync = ends or self.ddp is None
        with contextlib.nullcontext() if sync else self.ddp.no_sync():
            loss = self.forward_backward(batch, perm, weights, group_size)
        if not ends:
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
        if self.scaler.is_enabled():  # it hands the kernel its own found_inf, lowers the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:  # fused AdamW leaves weights, moments and step counts alone where it is set
            self.optimizer.found_inf = bad
            self.optimizer.step()
            del self.optimizer.found_inf
        if self.ema:
            self.ema.update(1.0 - bad)
        return bad.clone()

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # loading gave each group its saved lr
            group["lr"] = self.lr
        self.scaler.load_state_dict(state["scaler"])
        if self.ema and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])


class BadSteps:
    """Counts updates skipped by the non-finite guard, on the device: all of the run, the
    streak now and the longest streak since the last check (read at log intervals)."""

    def __init__(self, device: torch.device, limit: int, checkpoint: str) -> None:
        self.limit, self.checkpoint = limit, checkpoint
        self.total, self.streak, self.worst = (torch.zeros((), device=device) for _ in range(3))

    def count(self, bad: Tensor) -> None:
        self.total += bad
        self.streak.mul_(bad).add_(bad)  # (streak + 1) on a bad step, 0 on a good one
        torch.maximum(self.worst, self.streak, out=self.worst)

    def check(self, step: int, worst: float | None = None) -> None:
        """Stop with BadStepsError once the longest streak (`worst`, when already read)
        reaches train.max_bad_steps."""
        worst = self.worst.item() if worst is None else worst
        if worst >= self.limit:
            raise BadStepsError(
                f"the loss was NaN or inf for {int(worst)} steps in a row (train.max_bad_steps="
                f"{self.limit}), last at step {step}; those updates were skipped, and "
                f"{self.checkpoint} holds the last checkpoint. Try a lower optim.lr, "
                "optim.clip_grad, or train.precision=bf16")
        self.worst.zero_()


class BadStepsError(RuntimeError):
    """The loss stayed NaN or inf for train.max_bad_steps steps in a row."""
