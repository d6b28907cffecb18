"""Exponential moving average of the weights, updated with foreach ops (one kernel per group)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """Tracks `model`'s floating-point tensors; `update()` after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._ema = [t for t in self.module.state_dict().values() if t.is_floating_point()]
        # The optimizer updates the live tensors in place, so the list stays valid.
        self._live = [t for t in model.state_dict().values() if t.is_floating_point()]

    @torch.no_grad()
    def update(self, active: float | torch.Tensor = 1.0) -> None:
        """active: 0 leaves the average as it is (a skipped step). A device tensor costs no
        sync: it goes in as a list of tensor weights, where a 0-dim tensor in the scalar
        overload would be read on the host."""
        weight = (1.0 - self.decay) * active
        if isinstance(weight, torch.Tensor):
            torch._foreach_lerp_(self._ema, self._live, [weight] * len(self._ema))
        else:
            torch._foreach_lerp_(self._ema, self._live, weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
