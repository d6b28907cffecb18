"""A DeiT-Ti with every Triton op on equals the eager model: logits and every gradient."""

import pytest
import torch

from deit_fast.kernels import triton_runnable
from deit_fast.models import create_model
from deit_fast.ops import KernelChoice

# Interpreted on CPU tensors where TRITON_INTERPRET=1 (tests/conftest.py), else on the GPU.
DEVICE = "cpu" if triton_runnable("cpu")[0] else "cuda"
EAGER = KernelChoice(attention="eager", layernorm="torch", gelu="torch")
TRITON = KernelChoice(attention="triton", layernorm="triton", gelu="triton")


def _logits_and_grads(model: torch.nn.Module, images: torch.Tensor, dlogits: torch.Tensor):
    pixels = images.clone().requires_grad_()
    logits = model(pixels)
    (logits * dlogits).sum().backward()
    return logits, pixels.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_triton_model_equals_eager_model(name: str) -> None:
    # 64 px gives 16 patches (N = 17, or 18 with the distillation token): fast when interpreted.
    size = {"img_size": 64, "depth": 2, "num_classes": 10}
    with torch.device(DEVICE):
        eager = create_model(name, kernels=EAGER, **size).eval()
        with torch.no_grad():  # LayerNorms and biases off identity/zero: every input matters
            for parameter in eager.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        triton = create_model(name, kernels=TRITON, **size).eval()
        triton.load_state_dict(eager.state_dict())
        images, dlogits = torch.randn(2, 3, 64, 64), torch.randn(2, 10)

    expected, expected_dpixels, expected_grads = _logits_and_grads(eager, images, dlogits)
    logits, dpixels, grads = _logits_and_grads(triton, images, dlogits)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dpixels, expected_dpixels, atol=1e-5, rtol=1e-4)
    assert grads.keys() == expected_grads.keys()
    for key, grad in grads.items():
        # A parameter's gradient sums over every token and image: fp32 rounding in the
        # kernels' other summation order grows with the size of the tensor's entries.
        scale = max(1.0, expected_grads[key].abs().max().item())
        torch.testing.assert_close(grad, expected_grads[key], atol=1e-5 * scale, rtol=1e-4,
                                   msg=lambda message, key=key: f"grad of {key}: {message}")


def test_autocast_layer_norms_feed_the_linears_in_the_compute_dtype() -> None:
    """Under bf16 autocast every fused LayerNorm writes y in bf16 and keeps the stream s in
    fp32, and the model's logits and gradients stay those of the torch LayerNorm model."""
    size = {"img_size": 64, "depth": 2, "num_classes": 10}
    with torch.device(DEVICE):
        eager = create_model("deit_tiny_patch16_224", kernels=EAGER, **size)
        # The interpreter has no real bf16 dot: its attention is checked on a GPU only.
        choice = KernelChoice("eager" if DEVICE == "cpu" else "triton", "triton", "triton")
        triton = create_model("deit_tiny_patch16_224", kernels=choice, **size)
        triton.load_state_dict(eager.state_dict())
        images, dlogits = torch.randn(2, 3, 64, 64), torch.randn(2, 10)
    seen = []
    for norm in (m for m in triton.modules() if type(m).__name__ == "LayerNorm"):
        norm.register_forward_hook(lambda m, i, out: seen.append((out[0].dtype, out[1].dtype)))
    results = []
    for model in (eager, triton):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            results.append(_logits_and_grads(model, images, dlogits))
    assert seen == [(torch.bfloat16, torch.float32)] * 5  # 2 blocks x 2 norms + the final one
    (expected, expected_dpixels, expected_grads), (logits, dpixels, grads) = results
    torch.testing.assert_close(logits.float(), expected.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dpixels, expected_dpixels, atol=2e-2, rtol=2e-2)
    for key, grad in grads.items():  # bf16 rounding differs element-wise: compare norms
        error = (grad - expected_grads[key]).norm() / expected_grads[key].norm()
        assert error < 2e-2, f"grad of {key}: relative error {error:.3g}"
