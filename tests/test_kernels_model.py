"""A DeiT-Ti with every Triton op on equals the eager model: logits and every gradient."""

import pytest
import torch

from deit_fast.models import create_model
from deit_fast.ops import KernelChoice
from kernels import triton_runnable

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
        torch.testing.assert_close(grad, expected_grads[key], atol=1e-5, rtol=1e-4,
                                   msg=lambda message, key=key: f"grad of {key}: {message}")
