"""Top-1 / top-5 evaluation; the sums stay on the device and are read once, at the end."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], device: torch.device,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             ) -> dict[str, float]:
    """Accuracy in percent and mean cross-entropy over every sample the loader yields."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # top1, top5, loss sum
    count = 0  # known from the shapes, so kept on the host
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.eq(labels[:, None])
        totals += torch.stack([hits[:, 0].sum(), hits.any(dim=-1).sum(),
                               F.cross_entropy(logits, labels, reduction="sum")]).double()
        count += labels.numel()
    model.train(was_training)
    totals = torch.cat([totals, totals.new_full((1,), count)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    top1, top5, loss, count = totals.tolist()  # the one read of the whole evaluation
    if count == 0:
        raise ValueError("evaluation saw no samples: the validation set is empty")
    return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "val_loss": loss / count}
