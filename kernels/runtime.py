"""What the kernels ask of the Triton runtime they were built under."""

import functools

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _probe():
    pass


# Triton decides at decoration time: TRITON_INTERPRET=1 when triton was first imported.
INTERPRETED = isinstance(_probe, InterpretedFunction)


@functools.lru_cache
def row_programs_cap(device: torch.device) -> int:
    """Programs for a row-tiled reduction: a few per SM keep every SM busy while the fp32
    partials stay small."""
    if device.type != "cuda" or INTERPRETED:
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count
