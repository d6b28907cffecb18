"""AdamW with the DeiT parameter groups, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from deit_fast.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norm weights, tokens and the position embedding."""
    skip = getattr(model, "no_weight_decay", lambda: set())()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The paper's rule: lr * global batch / 512."""
    return cfg.lr * global_batch / 512 if cfg.scale_lr else cfg.lr


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: torch.Tensor,
                    capturable: bool = False) -> torch.optim.AdamW:
    """Fused AdamW on every device: its step counts live on the device and it reads the lr
    (`lr`, a float32 device tensor every group shares, filled from the schedule) and a
    found-inf flag as device tensors, so a step never reads a value on the host (the
    foreach AdamW reads each step count). `capturable` lets a CUDA graph capture it."""
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=0.0,
                                  betas=cfg.betas, eps=cfg.eps, fused=True,
                                  capturable=capturable)
    for group in optimizer.param_groups:  # the kernel reads it where the step fills it
        group["lr"] = lr
    return optimizer


class CosineSchedule:
    """Per-step: linear warm-up from warmup_lr to lr, then cosine from lr down to min_lr."""

    def __init__(self, lr: float, min_lr: float, warmup_lr: float, warmup_steps: int,
                 total_steps: int) -> None:
        self.lr, self.min_lr, self.warmup_lr = lr, min_lr, warmup_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))


def warn_if_warmup_covers(schedule: CosineSchedule, run_updates: int, warmup_epochs: float,
                          epochs: int, max_steps: int | None) -> None:
    """Warn when the warm-up lasts the whole run: the lr would never reach optim.lr."""
    if schedule.warmup_steps >= run_updates > 0 and warmup_epochs > 0:
        warnings.warn(f"optim.warmup_epochs={warmup_epochs:g} is as long as the whole run "
                      f"({run_updates} updates of train.epochs={epochs}, train.max_steps="
                      f"{max_steps}): the learning rate never reaches optim.lr; lower "
                      "optim.warmup_epochs", stacklevel=3)
