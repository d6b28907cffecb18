"""Triton attention against the torch reference: outputs and dqkv in fp32 (and fp16)."""

import pytest
import torch

from deit_fast.kernels import attention, attention_reference, triton_runnable

TOLERANCE = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}


# on CPU tensors under the Triton interpreter (tests/conftest.py), else on the GPU
pytestmark = pytest.mark.usefixtures("poisoned_allocations", "kernel_device")


def _check_against_reference(qkv: torch.Tensor, num_heads: int, dout: torch.Tensor,
                             scale: float | None = None) -> None:
    """Triton on qkv's dtype equals the fp32 reference on the same values, output and dqkv."""
    qkv = qkv.detach().requires_grad_()
    out = attention(qkv, num_heads, scale)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    qkv32 = qkv.detach().float().requires_grad_()
    expected = attention_reference(qkv32, num_heads, scale)
    (expected_dqkv,) = torch.autograd.grad(expected, qkv32, dout.float())
    assert out.dtype == dqkv.dtype == qkv.dtype
    assert out.shape == expected.shape and dqkv.shape == qkv.shape
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[qkv.dtype])
    torch.testing.assert_close(dqkv.float(), expected_dqkv, **TOLERANCE[qkv.dtype])


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("num_heads", [1, 3])
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("seq_len", [1, 17, 197, 198])
def test_matches_reference_fp32(seq_len: int, head_dim: int, num_heads: int, batch: int) -> None:
    width = num_heads * head_dim
    qkv = torch.randn(batch, seq_len, 3 * width)
    _check_against_reference(qkv, num_heads, torch.randn(batch, seq_len, width))


def test_head_dim_128_and_explicit_scale() -> None:
    qkv = torch.randn(1, 33, 3 * 128)
    _check_against_reference(qkv, 1, torch.randn(1, 33, 128), scale=0.3)


def test_reads_and_writes_through_strides() -> None:
    """qkv as a column slice of a wider buffer, and a transposed (non-contiguous) dout."""
    batch, seq_len, num_heads, head_dim = 2, 40, 2, 32
    width = num_heads * head_dim
    buffer = torch.randn(batch, seq_len, 3 * width + 16)
    qkv = buffer[..., 8 : 8 + 3 * width]
    dout = torch.randn(seq_len, batch, width).transpose(0, 1)
    assert qkv.stride(1) != 3 * width and not dout.is_contiguous()
    _check_against_reference(qkv, num_heads, dout)


def test_fp16() -> None:
    qkv = torch.randn(2, 45, 3 * 2 * 32).half()
    _check_against_reference(qkv, 2, torch.randn(2, 45, 64).half())


@pytest.mark.parametrize(
    ("qkv", "num_heads", "message"),
    [
        (torch.randn(2, 5, 3 * 48), 1, r"head dim 48 .* accepted head dims are 32, 64, 128"),
        (torch.randn(2, 3 * 64, 5).transpose(1, 2), 1, r"contiguous in its last dim"),
        (torch.randn(2, 5, 3 * 64, dtype=torch.float64), 1, r"float64; accepted dtypes"),
        (torch.randn(5, 3 * 64), 1, r"3 dims \[B, N, 3\*H\*D\]"),
        (torch.randn(2, 5, 3 * 64 + 1), 1, r"not divisible by 3 \* num_heads = 3"),
        (torch.randn(2, 5, 3 * 64), 0, r"not divisible by 3 \* num_heads = 0"),
    ],
)
def test_rejects_unsupported_input(qkv: torch.Tensor, num_heads: int, message: str) -> None:
    for op in (attention, attention_reference):
        with pytest.raises(ValueError, match=message):
            op(qkv, num_heads)


def test_registered_op_schema_and_autograd() -> None:
    qkv = torch.randn(1, 9, 3 * 32, requires_grad=True)
    result = torch.library.opcheck(
        torch.ops.deit_fast.attention_fwd.default, (qkv, 1, 0.2),
        test_utils=("test_schema", "test_autograd_registration"),
    )
    assert set(result.values()) == {"SUCCESS"}


def test_triton_runnable_says_why_not(kernel_device: str) -> None:
    assert triton_runnable(kernel_device) == (True, "")
    runnable, why = triton_runnable("meta")
    assert not runnable and "meta" in why
