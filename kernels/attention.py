"""Flash-style softmax attention on the packed qkv of a ViT block.

qkv is the output of the block's qkv Linear, `[B, N, 3*H*D]`, laid out like timm's
`reshape(B, N, 3, H, D)`. The kernels read q, k and v through strides (no permute or copy)
and write `[B, N, H*D]` with heads side by side, ready for proj. The forward keeps a running
(online) softmax and saves the base-2 logsumexp of each row; the backward recomputes the
probabilities from it and writes dq, dk, dv straight into a packed `[B, N, 3*H*D]` gradient.

ViT sequences are short (N = 197 or 198): one 64-row tile pads 197 to 256, as 128 does, and
small tiles give 4 programs per (batch, head), enough to fill an H200 at batch 256.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .runtime import INTERPRETED

_LOG2E = 1.4426950408889634
_HEAD_DIMS = (32, 64, 128)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _head_program(qkv_ptr, stride_qkv_b, num_heads, HEAD_DIM: tl.constexpr):
    """This program's (batch, head) pair: its flat index, batch, head, and q in qkv."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    return pid_bh, b, h, qkv_ptr + b * stride_qkv_b + h * HEAD_DIM


@triton.jit
def _load_rows(head_ptr, rows, stride_n, seq_len, HEAD_DIM: tl.constexpr):
    """Rows of one head's [N, HEAD_DIM] slice; rows at or past seq_len read 0."""
    dims = tl.arange(0, HEAD_DIM)
    offsets = rows[:, None] * stride_n + dims[None, :]
    return tl.load(head_ptr + offsets, mask=(rows < seq_len)[:, None], other=0.0)


@triton.jit(do_not_specialize=["seq_len"])  # N = 1 needs no kernel of its own
def _attention_fwd_kernel(
    qkv_ptr, out_ptr, lse_ptr, stride_qkv_b, stride_qkv_n, stride_out_b, stride_out_n,
    seq_len, num_heads, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_bh, b, h, q_ptr = _head_program(qkv_ptr, stride_qkv_b, num_heads, HEAD_DIM)
    k_ptr = q_ptr + num_heads * HEAD_DIM
    v_ptr = k_ptr + num_heads * HEAD_DIM
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < seq_len
    dims = tl.arange(0, HEAD_DIM)
    q = _load_rows(q_ptr, rows, stride_qkv_n, seq_len, HEAD_DIM)

    # Online softmax in base 2: qk_scale already holds log2(e).
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < seq_len
        k = _load_rows(k_ptr, cols, stride_qkv_n, seq_len, HEAD_DIM)
        v = _load_rows(v_ptr, cols, stride_qkv_n, seq_len, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        qk = tl.where(col_mask[None, :], qk, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(qk, axis=1))
        correction = tl.exp2(row_max - new_max)
        p = tl.exp2(qk - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None]
        acc += tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        row_max = new_max

    out = acc / row_sum[:, None]
    out_offsets = b * stride_out_b + rows[:, None] * stride_out_n + h * HEAD_DIM + dims[None, :]
    tl.store(out_ptr + out_offsets, out, mask=row_mask[:, None])
    tl.store(lse_ptr + pid_bh * seq_len + rows, row_max + tl.log2(row_sum), mask=row_mask)


@triton.jit(do_not_specialize=["seq_len"])  # N = 1 needs no kernel of its own
def _attention_bwd_dq_kernel(
    qkv_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr,
    stride_qkv_b, stride_qkv_n, stride_out_b, stride_out_n, stride_dout_b, stride_dout_n,
    stride_dqkv_b, stride_dqkv_n, seq_len, num_heads, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # One tile of query rows: computes delta = rowsum(dout * out) for the dk/dv kernel
    # that runs next, then dq = scale * dS @ K over all keys.
    pid_bh, b, h, q_ptr = _head_program(qkv_ptr, stride_qkv_b, num_heads, HEAD_DIM)
    k_ptr = q_ptr + num_heads * HEAD_DIM
    v_ptr = k_ptr + num_heads * HEAD_DIM
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < seq_len
    head_cols = h * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    q = _load_rows(q_ptr, rows, stride_qkv_n, seq_len, HEAD_DIM)
    out_head_ptr = out_ptr + b * stride_out_b + h * HEAD_DIM
    out = _load_rows(out_head_ptr, rows, stride_out_n, seq_len, HEAD_DIM)
    dout_head_ptr = dout_ptr + b * stride_dout_b + h * HEAD_DIM
    dout = _load_rows(dout_head_ptr, rows, stride_dout_n, seq_len, HEAD_DIM)
    delta = tl.sum(out.to(tl.float32) * dout.to(tl.float32), axis=1)
    tl.store(delta_ptr + pid_bh * seq_len + rows, delta, mask=row_mask)
    lse = tl.load(lse_ptr + pid_bh * seq_len + rows, mask=row_mask, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < seq_len
        k = _load_rows(k_ptr, cols, stride_qkv_n, seq_len, HEAD_DIM)
        v = _load_rows(v_ptr, cols, stride_qkv_n, seq_len, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        p = tl.where(col_mask[None, :], tl.exp2(qk - lse[:, None]), 0.0)
        dp = tl.dot(dout, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)

    dq_offsets = b * stride_dqkv_b + rows[:, None] * stride_dqkv_n + head_cols
    tl.store(dqkv_ptr + dq_offsets, dq * scale, mask=row_mask[:, None])


@triton.jit(do_not_specialize=["seq_len"])  # N = 1 needs no kernel of its own
def _attention_bwd_dkdv_kernel(
    qkv_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr,
    stride_qkv_b, stride_qkv_n, stride_dout_b, stride_dout_n,
    stride_dqkv_b, stride_dqkv_n, seq_len, num_heads, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # One tile of key rows, in transposed form: dv = P^T @ dout, dk = scale * dS^T @ Q.
    pid_bh, b, h, q_ptr = _head_program(qkv_ptr, stride_qkv_b, num_heads, HEAD_DIM)
    width = num_heads * HEAD_DIM
    dout_head_ptr = dout_ptr + b * stride_dout_b + h * HEAD_DIM
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < seq_len
    dims = tl.arange(0, HEAD_DIM)
    k = _load_rows(q_ptr + width, cols, stride_qkv_n, seq_len, HEAD_DIM)
    v = _load_rows(q_ptr + 2 * width, cols, stride_qkv_n, seq_len, HEAD_DIM)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start in range(0, seq_len, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < seq_len
        q = _load_rows(q_ptr, rows, stride_qkv_n, seq_len, HEAD_DIM)
        dout = _load_rows(dout_head_ptr, rows, stride_dout_n, seq_len, HEAD_DIM)
        # lse = +inf on padded query rows makes their probabilities exactly 0.
        lse = tl.load(lse_ptr + pid_bh * seq_len + rows, mask=row_mask, other=float("inf"))
        delta = tl.load(delta_ptr + pid_bh * seq_len + rows, mask=row_mask, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale
        p_t = tl.exp2(qk_t - lse[None, :])
        dv += tl.dot(p_t.to(dout.dtype), dout, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(dout), input_precision=INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=INPUT_PRECISION)

    dk_ptr = dqkv_ptr + b * stride_dqkv_b + width + h * HEAD_DIM
    dkv_offsets = cols[:, None] * stride_dqkv_n + dims[None, :]
    tl.store(dk_ptr + dkv_offsets, dk * scale, mask=col_mask[:, None])
    tl.store(dk_ptr + width + dkv_offsets, dv, mask=col_mask[:, None])


def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
        for m, n, warps, stages in shapes
    ]


_KERNELS = (_attention_fwd_kernel, _attention_bwd_dq_kernel, _attention_bwd_dkdv_kernel)
if INTERPRETED:
    # The interpreter cannot autotune; fixed tiles of unequal size still cover every mask.
    _LAUNCHED = {"half": _KERNELS, "fp32": _KERNELS}
    _FIXED_TILES = {"BLOCK_M": 64, "BLOCK_N": 32}
else:
    # Few configs: each compiles per dtype and head dim on the first step, and every one
    # must build without spills at every head dim, on sm_90 and sm_80 (benchmarks/compile.py).
    # (BLOCK_M, BLOCK_N, warps, stages) for the fwd, dq and dk/dv kernels.
    _TILES = {
        # fp16/bf16: the rows of each dot's first operand (BLOCK_M for fwd and dq, BLOCK_N
        # for dk/dv) stay at 64 or more, what Hopper's wgmma needs (32 rows fall back to
        # mma); the dk/dv kernel keeps two fp32 accumulators, so its 64-row tile takes 8
        # warps (4 spill at head dim 128), and fwd's 2-stage 64x64 tile spills on sm_80.
        "half": ([(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3)],
                 [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2)],
                 [(64, 64, 8, 2), (32, 64, 4, 2)]),
        # fp32 (the test path): dots run on FMA with whole operand rows in registers, so
        # small tiles over 8 warps, one config each.
        "fp32": ([(16, 32, 8, 1)], [(16, 16, 8, 1)], [(16, 32, 8, 1)]),
    }
    _LAUNCHED = {
        table: tuple(
            triton.autotune(_configs(shapes), key=["seq_len", "HEAD_DIM"])(kernel)
            for kernel, shapes in zip(_KERNELS, tiles)
        )
        for table, tiles in _TILES.items()
    }
    _FIXED_TILES = {}


def _tiles(dtype: torch.dtype) -> str:
    """The tile table of a dtype: fp16/bf16 dots run on tensor cores, fp32 ones on FMA."""
    return "fp32" if dtype == torch.float32 else "half"


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 stays fp32 (torch's default matmul precision; tf32 would cost ~3 digits); for
    # fp16/bf16 operands the setting changes nothing
    return "ieee" if dtype == torch.float32 else "tf32"


@triton_op("deit_fast::attention_fwd", mutates_args=())
def _attention_fwd(qkv: Tensor, num_heads: int, scale: float) -> tuple[Tensor, Tensor]:
    batch, seq_len, packed = qkv.shape
    head_dim = packed // (3 * num_heads)
    out = torch.empty((batch, seq_len, num_heads * head_dim), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((batch, num_heads, seq_len), device=qkv.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * num_heads)
    fwd, _, _ = _LAUNCHED[_tiles(qkv.dtype)]
    wrap_triton(fwd)[grid](
        qkv, out, lse, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        seq_len, num_heads, scale * _LOG2E,
        HEAD_DIM=head_dim, INPUT_PRECISION=_input_precision(qkv.dtype), **_FIXED_TILES,
    )
    return out, lse


@triton_op("deit_fast::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int, scale: float
) -> Tensor:
    batch, seq_len, packed = qkv.shape
    head_dim = packed // (3 * num_heads)
    dqkv = torch.empty((batch, seq_len, packed), device=qkv.device, dtype=qkv.dtype)
    delta = torch.empty_like(lse)
    precision = _input_precision(qkv.dtype)
    _, bwd_dq, bwd_dkdv = _LAUNCHED[_tiles(qkv.dtype)]
    grid_m = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * num_heads)
    wrap_triton(bwd_dq)[grid_m](
        qkv, out, dout, lse, delta, dqkv,
        qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        dout.stride(0), dout.stride(1), dqkv.stride(0), dqkv.stride(1),
        seq_len, num_heads, scale * _LOG2E, scale,
        HEAD_DIM=head_dim, INPUT_PRECISION=precision, **_FIXED_TILES,
    )
    grid_n = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_N"]), batch * num_heads)
    wrap_triton(bwd_dkdv)[grid_n](
        qkv, dout, lse, delta, dqkv,
        qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1),
        dqkv.stride(0), dqkv.stride(1), seq_len, num_heads, scale * _LOG2E, scale,
        HEAD_DIM=head_dim, INPUT_PRECISION=precision, **_FIXED_TILES,
    )
    return dqkv


def _setup_context(ctx, inputs, output) -> None:
    qkv, num_heads, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads, ctx.scale = num_heads, scale


def _backward(ctx, dout: Tensor, _dlse: Tensor) -> tuple[Tensor, None, None]:
    qkv, out, lse = ctx.saved_tensors
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dqkv = torch.ops.deit_fast.attention_bwd(dout, qkv, out, lse, ctx.num_heads, ctx.scale)
    return dqkv, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _head_dim(qkv: Tensor, num_heads: int) -> int:
    """Checks qkv against the contract and returns the head dim."""
    if qkv.dim() != 3:
        raise ValueError(
            f"attention: qkv must have 3 dims [B, N, 3*H*D], got shape {tuple(qkv.shape)}"
        )
    if qkv.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"attention: qkv is {qkv.dtype}; accepted dtypes are float16, bfloat16 and float32"
        )
    packed = qkv.shape[-1]
    if num_heads < 1 or packed % (3 * num_heads) != 0:
        raise ValueError(
            f"attention: the last dim of qkv ({packed}) must be 3 * num_heads * head_dim, "
            f"but it is not divisible by 3 * num_heads = {3 * num_heads}"
        )
    head_dim = packed // (3 * num_heads)
    if head_dim not in _HEAD_DIMS:
        raise ValueError(
            f"attention: head dim {head_dim} (= {packed} / (3 * {num_heads} heads)) is not "
            f"supported; accepted head dims are {', '.join(map(str, _HEAD_DIMS))}"
        )
    if qkv.stride(-1) != 1:
        raise ValueError(
            f"attention: qkv must be contiguous in its last dim (stride 1), got stride "
            f"{qkv.stride(-1)}; pass the qkv Linear's output directly or call .contiguous()"
        )
    return head_dim


def attention(qkv: Tensor, num_heads: int, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale) v for packed qkv `[B, N, 3*H*D]`; returns `[B, N, H*D]`.

    Layout as timm's Attention: qkv.reshape(B, N, 3, H, D) in, heads concatenated out.
    scale defaults to D ** -0.5.
    """
    head_dim = _head_dim(qkv, num_heads)
    scale = head_dim**-0.5 if scale is None else float(scale)
    out, _ = torch.ops.deit_fast.attention_fwd(qkv, num_heads, scale)
    return out


def attention_reference(qkv: Tensor, num_heads: int, scale: float | None = None) -> Tensor:
    """Plain torch eager attention in qkv's dtype, as timm's Attention computes it."""
    head_dim = _head_dim(qkv, num_heads)
    scale = head_dim**-0.5 if scale is None else float(scale)
    batch, seq_len, _ = qkv.shape
    q, k, v = qkv.reshape(batch, seq_len, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    weights = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return (weights @ v).transpose(1, 2).reshape(batch, seq_len, num_heads * head_dim)
