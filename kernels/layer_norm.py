"""Fused residual add + LayerNorm: s = x + residual, y = LayerNorm(s), in one pass.

s is the new residual stream: both outputs are used downstream, so the backward takes a
gradient for each and returns ds + dLN(dy) to x and to the residual. dweight and dbias are
reduced in two stages, in fp32: each program sums its rows, then the partial rows are summed.
Under autocast y feeds a low-precision Linear, so it is written in the compute dtype while
s keeps the residual stream's dtype.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .runtime import row_programs_cap

_MAX_WIDTH = 8192
_TILE_ELEMENTS = 4096
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr, residual_ptr, weight_ptr, bias_ptr, y_ptr, s_ptr, mean_ptr, rstd_ptr,
    n_rows, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    s = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        # Normalise the s that is returned (rounded to its dtype), as torch would.
        s = s.to(s_ptr.dtype.element_ty).to(tl.float32)
        tl.store(s_ptr + offsets, s, mask=mask)
    mean = tl.sum(s, axis=1) / n_cols
    centered = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / n_cols + eps)
    w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + offsets, y, mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd_kernel(
    dy_ptr, ds_ptr, s_ptr, weight_ptr, mean_ptr, rstd_ptr, dsum_ptr,
    dweight_partial_ptr, dbias_partial_ptr, n_rows, n_cols,
    HAS_DS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program i walks row tiles i, i + P, i + 2P, ... and keeps its dweight/dbias share.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dweight = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    dbias = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for row_start in range(pid * BLOCK_M, n_rows, tl.num_programs(0) * BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        s = tl.load(s_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / n_cols
        c2 = tl.sum(wdy, axis=1) / n_cols
        dsum = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            dsum += tl.load(ds_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(dsum_ptr + offsets, dsum, mask=mask)
        dweight += dy * xhat
        dbias += dy
    partial = pid * n_cols + cols
    tl.store(dweight_partial_ptr + partial, tl.sum(dweight, axis=0), mask=col_mask)
    tl.store(dbias_partial_ptr + partial, tl.sum(dbias, axis=0), mask=col_mask)


def _tiles(n_cols: int) -> tuple[int, int, int]:
    """(rows per tile, columns per tile, warps): a tile holds whole rows, ~4096 values."""
    # int(): the tiles are constexprs, so a traced width is specialised, not symbolic.
    block_c = triton.next_power_of_2(int(n_cols))
    block_m = max(1, _TILE_ELEMENTS // block_c)
    return block_m, block_c, 8 if block_c <= 4096 else 16


@triton_op("deit_fast::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(
    x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None, eps: float,
    y_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, s, mean, rstd); y in y_dtype, by default s's dtype."""
    n_cols = weight.shape[0]
    n_rows = x.numel() // n_cols
    s_dtype = _stream_dtype(x, residual)
    y = torch.empty(x.shape, device=x.device, dtype=y_dtype or s_dtype)
    # Without a residual s is x itself, which the caller returns (an op may not return
    # one of its inputs), so s here is an empty placeholder.
    s = torch.empty(x.shape if residual is not None else (0,), device=x.device, dtype=s_dtype)
    mean = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    block_m, block_c, num_warps = _tiles(n_cols)
    wrap_triton(_layer_norm_fwd_kernel)[(triton.cdiv(n_rows, block_m),)](
        x, x if residual is None else residual, weight, bias, y, s, mean, rstd,
        n_rows, n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return y, s, mean, rstd


@triton_op("deit_fast::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(
    dy: Tensor, ds: Tensor | None, s: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(ds + dLN(dy) in s's dtype, fp32 dweight, fp32 dbias)."""
    n_cols = weight.shape[0]
    n_rows = s.numel() // n_cols
    dsum = torch.empty_like(s)
    block_m, block_c, num_warps = _tiles(n_cols)
    programs = min(triton.cdiv(n_rows, block_m), row_programs_cap(s.device))
    dweight_partial = torch.empty((programs, n_cols), device=s.device, dtype=torch.float32)
    dbias_partial = torch.empty((programs, n_cols), device=s.device, dtype=torch.float32)
    wrap_triton(_layer_norm_bwd_kernel)[(programs,)](
        dy, dy if ds is None else ds, s, weight, mean, rstd, dsum,
        dweight_partial, dbias_partial, n_rows, n_cols,
        HAS_DS=ds is not None, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )
    return dsum, dweight_partial.sum(0), dbias_partial.sum(0)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, residual, _, _ = inputs
    y, s, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x if residual is None else s, weight, mean, rstd)
    ctx.dtypes = (x.dtype, None if residual is None else residual.dtype, bias.dtype)


def _backward(ctx, dy: Tensor | None, ds: Tensor | None, *_stat_grads: None) -> tuple:
    s, weight, mean, rstd = ctx.saved_tensors
    x_dtype, residual_dtype, bias_dtype = ctx.dtypes
    if dy is None:
        dy = torch.zeros_like(s)
    dsum, dweight, dbias = torch.ops.deit_fast.layer_norm_bwd(
        dy.contiguous(), None if ds is None else ds.contiguous(), s, weight, mean, rstd
    )
    dresidual = None if residual_dtype is None else dsum.to(residual_dtype)
    return (dsum.to(x_dtype), dweight.to(weight.dtype), dbias.to(bias_dtype), dresidual,
            None, None)


_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _stream_dtype(x: Tensor, residual: Tensor | None) -> torch.dtype:
    """s's dtype: the promoted dtype of x and residual (fp32 for an fp32 stream)."""
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _y_dtype(x: Tensor, residual: Tensor | None) -> torch.dtype:
    """y's dtype: the autocast compute dtype when autocast is on, else s's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return _stream_dtype(x, residual)


def _check(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None) -> None:
    tensors = {"x": x, "weight": weight, "bias": bias, "residual": residual}
    for name, t in tensors.items():
        if t is not None and t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(
                f"layer_norm: {name} is {t.dtype}; accepted dtypes are float16, bfloat16 "
                "and float32"
            )
        if t is not None and t.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {t.device} but x is on {x.device}")
    width = x.shape[-1] if x.dim() > 0 else 0
    if weight.shape != (width,) or bias.shape != (width,):
        raise ValueError(
            f"layer_norm: weight and bias must have shape ({width},) to match the last dim of "
            f"x {tuple(x.shape)}; got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    if not 0 < width <= _MAX_WIDTH:
        raise ValueError(f"layer_norm: rows of 1 to {_MAX_WIDTH} values are accepted, got {width}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"layer_norm: residual has shape {tuple(residual.shape)} but x has "
            f"{tuple(x.shape)}; they must match"
        )


def layer_norm(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6, residual: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(y, s): s = x + residual (x when residual is None), y = LayerNorm(s) over the last dim.

    s takes the promoted dtype of x and residual; so does y, except under autocast, where
    y is written in the compute dtype. Statistics are computed in fp32. Any leading shape;
    non-contiguous inputs are copied first.
    """
    _check(x, weight, bias, residual)
    y, s, _, _ = torch.ops.deit_fast.layer_norm_fwd(
        x.contiguous(), weight.contiguous(), bias.contiguous(),
        None if residual is None else residual.contiguous(), eps, _y_dtype(x, residual),
    )
    return y, x if residual is None else s


def layer_norm_reference(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6, residual: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Plain torch: s = x + residual, y = F.layer_norm(s), in y's dtype as layer_norm."""
    _check(x, weight, bias, residual)
    s = x if residual is None else x + residual
    y = torch.nn.functional.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    return y.to(_y_dtype(x, residual)), s
