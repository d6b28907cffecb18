"""train.cuda_graphs: the whole update (mixing, forward, backward, non-finite guard, AdamW,
EMA) captured once in a CUDA graph and replayed, one launch a step instead of thousands.

The captured update is step.TrainStep's own, a function of device buffers only: the batch
(with a teacher cache, its top-k too), the mixing draw as two small tensors
(data_pipeline.mixup's `params`), and the optimizer's lr tensor, which the step fills
before each replay. Each step copies its inputs into the captured buffers and replays. The
first WARMUP steps run eagerly on a side stream (real steps: they create the optimizer
state and let the allocator and cuBLAS settle); the next one is captured, then every step
replays it.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

WARMUP = 3
FIELDS = ("images", "labels", "teacher_values", "teacher_indices")  # the batch's, copied in

Update = Callable[[Any, Tensor, Tensor], tuple[Tensor, Tensor]]


def _pinned(x: Tensor) -> Tensor:
    """A host tensor in pinned memory, so its copy to the GPU does not wait; else x."""
    return x.pin_memory() if x.device.type == "cpu" else x


class CapturedStep:
    """`captured(batch, perm, weights)` -> (loss, skipped flag), by replaying `update`."""

    def __init__(self, update: Update, zero_grad: Callable[[], None],
                 device: torch.device) -> None:
        self.update, self.zero_grad, self.device = update, zero_grad, device
        self.steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[Tensor | None] = []
        self.outputs: tuple[Tensor, Tensor] | None = None

    def run(self, images: Tensor, labels: Tensor, teacher_values: Tensor | None,
            teacher_indices: Tensor | None, perm: Tensor, weights: Tensor
            ) -> tuple[Tensor, Tensor]:
        batch = SimpleNamespace(images=images, labels=labels, teacher_values=teacher_values,
                                teacher_indices=teacher_indices)
        return self.update(batch, perm, weights)

    def __call__(self, batch: Any, perm: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        fields = [getattr(batch, name, None) for name in FIELDS] + [perm, weights]
        inputs = [x if x is None else _pinned(x).to(self.device, non_blocking=True)
                  for x in fields]
        if self.graph is None and self.steps < WARMUP:
            self.steps += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.zero_grad()
                out = self.run(*inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return out
        if self.graph is None:
            self.capture(inputs)
        else:
            self.load(inputs)
        self.graph.replay()
        loss, bad = self.outputs
        return loss.clone(), bad.clone()  # the captured outputs are rewritten by each replay

    def capture(self, inputs: list[Tensor | None]) -> None:
        self.inputs = [x if x is None else x.clone() for x in inputs]
        self.zero_grad()  # backward allocates the gradients inside the graph
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.run(*self.inputs)

    def load(self, inputs: list[Tensor | None]) -> None:
        names = (*FIELDS, "mixing pairing", "mixing weights")
        for name, static, x in zip(names, self.inputs, inputs):
            if (static is None) != (x is None) or (x is not None and x.shape != static.shape):
                shapes = [None if v is None else tuple(v.shape) for v in (static, x)]
                raise ValueError(f"train.cuda_graphs: the {name} changed from {shapes[0]} to "
                                 f"{shapes[1]}; a captured step needs the same shapes every "
                                 "step (full batches)")
            if x is not None:
                static.copy_(x, non_blocking=True)
