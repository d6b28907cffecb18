"""Triton bias+GELU against nn.GELU() of x + bias: output and both gradients, on CPU."""

import pytest
import torch

from deit_fast.kernels import bias_gelu, bias_gelu_reference

TOLERANCE = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}


# on CPU tensors under the Triton interpreter (tests/conftest.py), else on the GPU
pytestmark = pytest.mark.usefixtures("poisoned_allocations", "kernel_device")


def _check_against_gelu(x: torch.Tensor, bias: torch.Tensor) -> None:
    x, bias = x.detach().requires_grad_(), bias.detach().requires_grad_()
    y = bias_gelu(x, bias)
    dy = torch.randn(y.shape).to(y.dtype)
    dx, dbias = torch.autograd.grad(y, (x, bias), dy)
    x32, bias32 = x.detach().float().requires_grad_(), bias.detach().float().requires_grad_()
    expected = torch.nn.GELU()(x32 + bias32)
    expected_dx, expected_dbias = torch.autograd.grad(expected, (x32, bias32), dy.float())
    assert y.dtype == dx.dtype == x.dtype and dbias.dtype == bias.dtype
    tolerance = TOLERANCE[x.dtype]
    torch.testing.assert_close(y.float(), expected, **tolerance)
    torch.testing.assert_close(dx.float(), expected_dx, **tolerance)
    # dbias sums over rows: its rounding error grows like sqrt(rows).
    row_scale = (x.numel() // x.shape[-1]) ** 0.5
    torch.testing.assert_close(dbias.float(), expected_dbias, atol=tolerance["atol"] * row_scale,
                               rtol=tolerance["rtol"])


@pytest.mark.parametrize("shape", [(2, 197, 768), (2, 17, 300), (5, 1), (1, 1536)])
def test_matches_nn_gelu_fp32(shape: tuple[int, ...]) -> None:
    _check_against_gelu(torch.randn(shape) * 3, torch.randn(shape[-1]))


def test_fp16() -> None:
    _check_against_gelu(torch.randn(3, 7, 384).half(), torch.randn(384).half())


def test_reference_is_nn_gelu() -> None:
    x, bias = torch.randn(4, 96), torch.randn(96)
    torch.testing.assert_close(bias_gelu_reference(x, bias), torch.nn.GELU()(x + bias))


def test_non_contiguous_input() -> None:
    _check_against_gelu(torch.randn(96, 4, 3).transpose(0, 2), torch.randn(96))


@pytest.mark.parametrize(
    ("x", "bias", "message"),
    [
        (torch.randn(4, 96), torch.randn(95), r"one value per column .* \(4, 96\) .* \(95,\)"),
        (torch.randn(4, 96), torch.randn(1, 96), r"bias must be 1-D"),
        (torch.randn(4, 96, dtype=torch.float64), torch.randn(96), r"float64 .* accepted dtypes"),
    ],
)
def test_rejects_unsupported_input(x: torch.Tensor, bias: torch.Tensor, message: str) -> None:
    for op in (bias_gelu, bias_gelu_reference):
        with pytest.raises(ValueError, match=message):
            op(x, bias)


def test_registered_op_schema_and_autograd() -> None:
    x, bias = torch.randn(3, 96, requires_grad=True), torch.randn(96, requires_grad=True)
    result = torch.library.opcheck(
        torch.ops.deit_fast.bias_gelu_fwd.default, (x, bias),
        test_utils=("test_schema", "test_autograd_registration"),
    )
    assert set(result.values()) == {"SUCCESS"}
