"""The Triton kernels on a CUDA GPU: bf16 and fp16 against an fp32 reference, the full
torch.library op checks, deit_fast's Block compiled with fullgraph=True (no graph break)
and captured in a CUDA graph.

Skipped without a GPU; scripts/gpu_check.sh runs them.
"""

import pytest
import torch
from torch import nn

from deit_fast.kernels import (
    attention,
    attention_reference,
    bias_gelu,
    bias_gelu_reference,
    layer_norm,
    layer_norm_reference,
)
from deit_fast.models.deit import Attention, Block, LayerNorm, Mlp

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned_allocations")]

DEVICE = "cuda"
LOW_PRECISION = [torch.bfloat16, torch.float16]
TOLERANCE = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}


def _max_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got.float() - expected).abs().max().item()


# Every head dim in bf16; fp16 at the DeiT head dim only (each new dtype/head dim compiles
# and autotunes the kernels again).
ATTENTION_CASES = [(n, d, torch.bfloat16) for n in (1, 17, 197, 198) for d in (32, 64, 128)]
ATTENTION_CASES += [(n, 64, torch.float16) for n in (1, 17, 197, 198)]


@pytest.mark.parametrize(("seq_len", "head_dim", "dtype"), ATTENTION_CASES)
def test_attention_low_precision(seq_len: int, head_dim: int, dtype: torch.dtype) -> None:
    """Error against fp32 at most twice that of torch's own attention in the same dtype."""
    batch, num_heads = 2, 3
    qkv = torch.randn(batch, seq_len, 3 * num_heads * head_dim, device=DEVICE, dtype=dtype)
    dout = torch.randn(batch, seq_len, num_heads * head_dim, device=DEVICE, dtype=dtype)
    results = {}
    for name, op, inputs in [("triton", attention, qkv), ("torch", attention_reference, qkv),
                             ("fp32", attention_reference, qkv.float())]:
        x = inputs.detach().requires_grad_()
        out = op(x, num_heads)
        results[name] = (out, *torch.autograd.grad(out, x, dout.to(x.dtype)))
    (out, dqkv), (torch_out, torch_dqkv), (expected, expected_dqkv) = results.values()
    assert out.dtype == dqkv.dtype == dtype
    assert _max_error(out, expected) <= 2 * _max_error(torch_out, expected) + 1e-3
    assert _max_error(dqkv, expected_dqkv) <= 2 * _max_error(torch_dqkv, expected_dqkv) + 1e-3


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("width", [192, 384, 768, 1024])
def test_layer_norm_low_precision(width: int, with_residual: bool, dtype: torch.dtype) -> None:
    new = lambda *shape: torch.randn(*shape, device=DEVICE, dtype=dtype)
    inputs = [new(4, 197, width), new(width), new(width)] + ([new(4, 197, width)] if with_residual
                                                            else [])
    grads_out = (new(4, 197, width), new(4, 197, width))
    results = []
    for op, cast in ((layer_norm, dtype), (layer_norm_reference, torch.float32)):
        leaves = [t.detach().to(cast).requires_grad_() for t in inputs]
        y, s = op(*leaves[:3], 1e-6, leaves[3] if with_residual else None)
        grads = torch.autograd.grad((y, s), leaves, [g.to(cast) for g in grads_out])
        results.append((y, s, *grads))
    rows = 4 * 197
    for i, (got, expected) in enumerate(zip(*results)):
        tolerance = dict(TOLERANCE[dtype])
        tolerance["atol"] *= rows**0.5 if i in (3, 4) else 1  # dweight, dbias sum over rows
        torch.testing.assert_close(got.float(), expected, **tolerance)


def test_layer_norm_fp32_stream_with_bf16_branch() -> None:
    """The autocast pattern: an fp32 residual stream plus a bf16 branch output."""
    x = torch.randn(4, 197, 384, device=DEVICE, requires_grad=True)
    branch = torch.randn(4, 197, 384, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(384, device=DEVICE, requires_grad=True)
    bias = torch.randn(384, device=DEVICE, requires_grad=True)
    y, s = layer_norm(x, weight, bias, 1e-6, branch)
    assert y.dtype == s.dtype == torch.float32
    expected_y, expected_s = layer_norm_reference(x, weight, bias, 1e-6, branch.float())
    torch.testing.assert_close(y, expected_y, **TOLERANCE[torch.float32])
    torch.testing.assert_close(s, expected_s, **TOLERANCE[torch.float32])
    (y.sum() + s.sum()).backward()
    assert branch.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("width", [768, 1536, 3072])
def test_bias_gelu_low_precision(width: int, dtype: torch.dtype) -> None:
    x = torch.randn(4, 197, width, device=DEVICE, dtype=dtype)
    bias = torch.randn(width, device=DEVICE, dtype=dtype)
    dy = torch.randn_like(x)
    results = []
    for op, cast in ((bias_gelu, dtype), (bias_gelu_reference, torch.float32)):
        leaves = [t.detach().to(cast).requires_grad_() for t in (x, bias)]
        y = op(*leaves)
        results.append((y, *torch.autograd.grad(y, leaves, dy.to(cast))))
    for i, (got, expected) in enumerate(zip(*results)):
        tolerance = dict(TOLERANCE[dtype])
        tolerance["atol"] *= (4 * 197) ** 0.5 if i == 2 else 1  # dbias sums over rows
        torch.testing.assert_close(got.float(), expected, **tolerance)


def test_ops_pass_torch_library_opcheck() -> None:
    """Schema, autograd registration, fake tensors and AOT dispatch: what torch.compile needs."""
    new = lambda *shape: torch.randn(*shape, device=DEVICE, dtype=torch.bfloat16,
                                     requires_grad=True)
    x, residual, weight, bias = new(2, 17, 192), new(2, 17, 192), new(192), new(192)
    cases = [
        (torch.ops.deit_fast.attention_fwd.default, (new(2, 17, 3 * 192), 3, 0.125)),
        (torch.ops.deit_fast.layer_norm_fwd.default, (x, weight, bias, residual, 1e-6)),
        (torch.ops.deit_fast.layer_norm_fwd.default, (x, weight, bias, None, 1e-6)),
        (torch.ops.deit_fast.bias_gelu_fwd.default, (new(2, 17, 768), new(768))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def _triton_block(dim: int, num_heads: int) -> Block:
    """deit_fast's own Block, every op on its Triton kernel."""
    block = Block(dim, num_heads, mlp_ratio=4.0, drop_path=0.0)
    for module in block.modules():
        if isinstance(module, (Attention, LayerNorm, Mlp)):
            module.impl = "triton"
    return block


def _block_step(block: nn.Module, x: torch.Tensor, pending: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of a forward and the gradients of every input and parameter."""
    x, pending = x.detach().requires_grad_(), pending.detach().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        stream, branch = block(x, pending)
    loss = (stream.float() ** 2).mean() + (branch.float() ** 2).mean()
    leaves = [x, pending, *block.parameters()]
    return [stream, branch, *torch.autograd.grad(loss, leaves)]


def test_compiled_block_matches_eager() -> None:
    torch.manual_seed(0)
    block = _triton_block(384, 6).to(DEVICE)
    x, pending = torch.randn(2, 2, 197, 384, device=DEVICE).unbind(0)
    compiled = torch.compile(block, fullgraph=True)  # a graph break in an op would fail here
    for got, expected in zip(_block_step(compiled, x, pending), _block_step(block, x, pending)):
        torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_block_captures_into_cuda_graph() -> None:
    torch.manual_seed(0)
    block = _triton_block(192, 3).to(DEVICE, torch.bfloat16)
    x, pending = torch.randn(2, 4, 197, 192, device=DEVICE, dtype=torch.bfloat16).unbind(0)
    expected = block(x, pending)
    sample = (x.clone().requires_grad_(), pending.clone().requires_grad_())
    graphed = torch.cuda.make_graphed_callables(block, sample)
    got = graphed(x.clone().requires_grad_(), pending.clone().requires_grad_())
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-2, rtol=1e-2)
    sum(t.float().sum() for t in got).backward()  # replays the captured backward
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())
