"""Triton residual+LayerNorm against add + F.layer_norm: y, s and every gradient, on CPU."""

import pytest
import torch

from deit_fast.kernels import layer_norm, layer_norm_reference

TOLERANCE = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 8e-3},
}


# on CPU tensors under the Triton interpreter (tests/conftest.py), else on the GPU
pytestmark = pytest.mark.usefixtures("poisoned_allocations", "kernel_device")


def _run(op, x, weight, bias, residual):
    """(y, s) and the gradients of a loss that uses both y and s (s feeds the next block)."""
    inputs = [t.detach().requires_grad_() for t in (x, weight, bias)]
    if residual is not None:
        inputs.append(residual.detach().requires_grad_())
    y, s = op(*inputs[:3], 1e-6, inputs[3] if residual is not None else None)
    same = torch.Generator().manual_seed(1)  # the same output gradients for both implementations
    dy = torch.randn(y.shape, generator=same, device="cpu").to(y.device)
    ds = torch.randn(s.shape, generator=same, device="cpu").to(s.device)
    loss = (y.float() * dy).sum() + (s.float() * ds).sum()
    return y, s, torch.autograd.grad(loss, inputs)


def _check_against_reference(x, weight, bias, residual=None) -> None:
    y, s, grads = _run(layer_norm, x, weight, bias, residual)
    upcast = [None if t is None else t.float() for t in (x, weight, bias, residual)]
    expected_y, expected_s, expected_grads = _run(layer_norm_reference, *upcast)
    torch.testing.assert_close(y.float(), expected_y, **TOLERANCE[y.dtype])
    torch.testing.assert_close(s.float(), expected_s, **TOLERANCE[s.dtype])
    # dweight and dbias sum over rows: their rounding error grows like sqrt(rows).
    row_scale = (x.numel() // x.shape[-1]) ** 0.5
    given = (x, weight, bias, residual)
    for i, (got, expected) in enumerate(zip(grads, expected_grads)):
        assert got.dtype == given[i].dtype
        tolerance = dict(TOLERANCE[got.dtype])
        tolerance["atol"] *= row_scale if i in (1, 2) else 1
        torch.testing.assert_close(got.float(), expected, **tolerance)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(2, 197, 192), (1, 17, 384), (3, 384)])
def test_matches_reference_fp32(shape: tuple[int, ...], with_residual: bool) -> None:
    width = shape[-1]
    residual = torch.randn(shape) if with_residual else None
    _check_against_reference(torch.randn(shape), torch.randn(width), torch.randn(width), residual)


@pytest.mark.parametrize("width", [7, 1000, 5000])
def test_any_width(width: int) -> None:
    """Widths that are not a power of two, below 192 and past 4096 (masked blocks)."""
    shape = (3, width)
    _check_against_reference(torch.randn(shape), torch.randn(width), torch.randn(width),
                             torch.randn(shape))


def test_fp16() -> None:
    x, residual = torch.randn(2, 9, 192).half(), torch.randn(2, 9, 192).half()
    _check_against_reference(x, torch.randn(192).half(), torch.randn(192).half(), residual)


def test_fp32_stream_with_fp16_branch() -> None:
    """Under autocast the residual stream is fp32 and the branch output half: s and y are fp32."""
    x, residual = torch.randn(2, 9, 192), torch.randn(2, 9, 192).half()
    y, s = layer_norm(x, torch.ones(192), torch.zeros(192), residual=residual)
    assert y.dtype == s.dtype == torch.float32
    _check_against_reference(x, torch.randn(192), torch.randn(192), residual)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("compute", [torch.float16, torch.bfloat16])
def test_autocast_writes_y_in_compute_dtype(compute: torch.dtype, with_residual: bool) -> None:
    """Under autocast the stream stays fp32 and y, which feeds a half Linear, is written in
    the compute dtype: LayerNorm in fp32, then cast. Gradients reach x, the half branch,
    weight and bias in their own dtypes."""
    shape = (2, 197, 192)
    x, weight, bias = torch.randn(shape), torch.randn(192), torch.randn(192)
    residual = torch.randn(shape).to(compute) if with_residual else None
    dy, ds = torch.randn(shape).to(compute), torch.randn(shape)
    results = []
    for op in (layer_norm, layer_norm_reference):
        leaves = [t.detach().requires_grad_() for t in (x, weight, bias, residual)
                  if t is not None]
        with torch.autocast("cpu", dtype=compute):
            y, s = op(*leaves[:3], 1e-6, leaves[3] if with_residual else None)
        assert y.dtype == compute and s.dtype == torch.float32
        outputs, grads_out = ((y, s), (dy, ds)) if with_residual else ((y,), (dy,))
        results.append((y, s, *torch.autograd.grad(outputs, leaves, grads_out)))
    expected = _run_fp32(x, weight, bias, residual, dy, ds if with_residual else None)
    for i, (got, reference, exact) in enumerate(zip(results[0], results[1], expected)):
        dtype = (compute, torch.float32, torch.float32, torch.float32, torch.float32, compute)[i]
        assert got.dtype == reference.dtype == dtype
        tolerance = dict(TOLERANCE[dtype])  # one rounding to the compute dtype at most
        tolerance["atol"] *= (x.numel() // 192) ** 0.5 if i in (3, 4) else 1  # row sums
        torch.testing.assert_close(got.float(), exact, **tolerance)
        torch.testing.assert_close(reference.float(), exact, **tolerance)


def _run_fp32(x, weight, bias, residual, dy, ds):
    """The fp32 truth: LayerNorm of x + residual, and the gradients of dy (and ds)."""
    leaves = [t.detach().float().requires_grad_() for t in (x, weight, bias, residual)
              if t is not None]
    s = leaves[0] + leaves[3] if residual is not None else leaves[0]
    y = torch.nn.functional.layer_norm(s, (192,), leaves[1], leaves[2], 1e-6)
    outputs, grads_out = ((y, s), (dy.float(), ds)) if ds is not None else ((y,), (dy.float(),))
    return (y, s, *torch.autograd.grad(outputs, leaves, grads_out))


def test_without_residual_s_is_x() -> None:
    x = torch.randn(4, 192)
    _, s = layer_norm(x, torch.ones(192), torch.zeros(192))
    assert s is x


@pytest.mark.parametrize(
    ("shapes", "dtype", "message"),
    [
        (((2, 192), (384,), (192,), None), torch.float32, r"weight and bias must have shape"),
        (((2, 192), (192,), (192,), (2, 191)), torch.float32, r"residual has shape \(2, 191\)"),
        (((2, 192), (192,), (192,), None), torch.float64, r"x is torch.float64; accepted dtypes"),
        (((2, 9000), (9000,), (9000,), None), torch.float32, r"rows of 1 to 8192 values"),
    ],
)
def test_rejects_unsupported_input(shapes, dtype: torch.dtype, message: str) -> None:
    x, weight, bias, residual = (None if s is None else torch.randn(s, dtype=dtype) for s in shapes)
    for op in (layer_norm, layer_norm_reference):
        with pytest.raises(ValueError, match=message):
            op(x, weight, bias, 1e-6, residual)


def test_registered_op_schema_and_autograd() -> None:
    x, residual = torch.randn(2, 3, 192, requires_grad=True), torch.randn(2, 3, 192)
    weight, bias = torch.randn(192, requires_grad=True), torch.randn(192, requires_grad=True)
    for res in (residual.requires_grad_(), None):
        result = torch.library.opcheck(
            torch.ops.deit_fast.layer_norm_fwd.default, (x, weight, bias, res, 1e-6, None),
            test_utils=("test_schema", "test_autograd_registration"),
        )
        assert set(result.values()) == {"SUCCESS"}
