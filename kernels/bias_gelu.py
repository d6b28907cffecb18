"""Fused bias + exact (erf) GELU: y = gelu(x + bias), forward and backward.

The MLP's fc1 runs without its bias and this op adds it, so the pre-activation is never
written to memory: the forward reads x once and writes y once, the backward recomputes
x + bias from x instead of saving it.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .runtime import row_programs_cap

_SQRT1_2: tl.constexpr = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)
_MAX_BLOCK_C = 256
_TILE_ELEMENTS = 4096
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _bias_gelu_fwd_kernel(
    x_ptr, bias_ptr, y_ptr, n_rows, n_cols,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    z = x + b[None, :]
    y = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    tl.store(y_ptr + offsets, y, mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    dy_ptr, x_ptr, bias_ptr, dx_ptr, dbias_partial_ptr, n_rows, n_cols,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program (i, j) walks row tiles i, i + P, i + 2P, ... of column block j, summing its
    # share of dbias in fp32; the P partial rows are summed afterwards (stage two).
    pid_m = tl.program_id(0)
    row_programs = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dbias = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for row_start in range(pid_m * BLOCK_M, n_rows, row_programs * BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        z = x + b[None, :]
        cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
        pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
        dz = dy * (cdf + z * pdf)
        tl.store(dx_ptr + offsets, dz, mask=mask)
        dbias += dz
    tl.store(dbias_partial_ptr + pid_m * n_cols + cols, tl.sum(dbias, axis=0), mask=col_mask)


def _tiles(n_cols: int) -> tuple[int, int]:
    """(rows per tile, columns per tile): tiles of ~4096 values, at most 256 columns wide."""
    # int(): the tiles are constexprs, so a traced width is specialised, not symbolic.
    block_c = min(triton.next_power_of_2(int(n_cols)), _MAX_BLOCK_C)
    return _TILE_ELEMENTS // block_c, block_c


@triton_op("deit_fast::bias_gelu_fwd", mutates_args=())
def _bias_gelu_fwd(x: Tensor, bias: Tensor) -> Tensor:
    n_cols = bias.shape[0]
    n_rows = x.numel() // n_cols
    y = torch.empty_like(x)
    block_m, block_c = _tiles(n_cols)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_c))
    wrap_triton(_bias_gelu_fwd_kernel)[grid](
        x, bias, y, n_rows, n_cols, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=8
    )
    return y


@triton_op("deit_fast::bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd(dy: Tensor, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    n_cols = bias.shape[0]
    n_rows = x.numel() // n_cols
    dx = torch.empty_like(x)
    block_m, block_c = _tiles(n_cols)
    row_programs = min(triton.cdiv(n_rows, block_m), row_programs_cap(x.device))
    dbias_partial = torch.empty((row_programs, n_cols), device=x.device, dtype=torch.float32)
    grid = (row_programs, triton.cdiv(n_cols, block_c))
    wrap_triton(_bias_gelu_bwd_kernel)[grid](
        dy, x, bias, dx, dbias_partial, n_rows, n_cols,
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=8,
    )
    return dx, dbias_partial.sum(0).to(bias.dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None]:
    x, bias = ctx.saved_tensors
    dx, dbias = torch.ops.deit_fast.bias_gelu_bwd(dy.contiguous(), x, bias)
    return dx, dbias


_bias_gelu_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(x: Tensor, bias: Tensor) -> None:
    if x.dtype not in _SUPPORTED_DTYPES or bias.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"bias_gelu: x is {x.dtype} and bias is {bias.dtype}; "
            "accepted dtypes are float16, bfloat16 and float32"
        )
    if bias.dim() != 1 or x.dim() == 0 or x.shape[-1] != bias.shape[0]:
        raise ValueError(
            f"bias_gelu: bias must be 1-D with one value per column of x; got x of shape "
            f"{tuple(x.shape)} and bias of shape {tuple(bias.shape)}"
        )
    if x.device != bias.device:
        raise ValueError(f"bias_gelu: x is on {x.device} but bias is on {bias.device}")


def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """gelu(x + bias) with the exact erf GELU; bias broadcasts over the last dim of x.

    The result has x's dtype; the sum and the GELU are computed in fp32. Any leading shape;
    a non-contiguous x is copied first.
    """
    _check(x, bias)
    return torch.ops.deit_fast.bias_gelu_fwd(x.contiguous(), bias.contiguous())


def bias_gelu_reference(x: Tensor, bias: Tensor) -> Tensor:
    """Plain torch: nn.GELU() of x + bias, returned in x's dtype like bias_gelu."""
    _check(x, bias)
    return torch.nn.functional.gelu(x + bias).to(x.dtype)
