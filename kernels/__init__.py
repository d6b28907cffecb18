"""Triton kernels of deit-fast, each registered as a `deit_fast::` torch.library op.

This folder is kernels/ at the top of the repository; it imports as deit_fast.kernels
(deit_fast/__init__.py adds the repository to that package's path in a checkout; the
wheel installs it as deit_fast/kernels). Each op has a plain torch reference with the same
contract; the tests hold them equal.
"""

import os

import torch

from .attention import attention, attention_reference
from .bias_gelu import bias_gelu, bias_gelu_reference
from .layer_norm import layer_norm, layer_norm_reference
from .runtime import INTERPRETED

__all__ = [
    "attention",
    "attention_reference",
    "bias_gelu",
    "bias_gelu_reference",
    "layer_norm",
    "layer_norm_reference",
    "triton_runnable",
]


def triton_runnable(device: torch.device | str) -> tuple[bool, str]:
    """(True, "") if the kernels can run on tensors on `device`, else (False, why not)."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available():
            return True, ""
        return False, "Triton kernels need a CUDA GPU, and torch.cuda.is_available() is False"
    if device.type == "cpu":
        if INTERPRETED:  # how the kernels were built, whatever the variable says now
            return True, ""
        return False, (
            "Triton kernels run on CPU tensors only under the Triton interpreter: set "
            f"TRITON_INTERPRET=1 before triton is first imported (it is "
            f"{os.environ.get('TRITON_INTERPRET', 'unset')!r})"
        )
    return False, f"Triton kernels run on cuda devices (or cpu when interpreted), not {device}"
