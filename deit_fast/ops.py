"""The one place that decides which implementation of attention, LayerNorm and GELU runs,
and in which precision the step computes.

`resolve_kernels` turns the config's wishes (auto | triton | sdpa | eager ...) into a
concrete `KernelChoice` for a device, or stops with a clear message when the wish cannot
run there. The model calls `attention`, `layer_norm` and `bias_gelu` below with that
choice; it never imports a kernel itself. The eager attention and the torch LayerNorm are
the kernels' own references (deit_fast.kernels; triton, which torch's Linux wheels bring,
must be importable). `autocast` is train.precision's context for the
training step, the evaluation and the teacher.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# each op's implementations; the config also accepts "auto" (see resolve_kernels)
ATTENTION = ("triton", "sdpa", "eager")
LAYERNORM = ("triton", "torch", "apex")
GELU = ("triton", "torch")
PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for train.precision (bf16, fp16) on `device`; fp32 runs as it is."""
    dtype = PRECISION[precision]
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class KernelUnavailable(RuntimeError):
    """A requested kernel implementation cannot run on this machine."""


@dataclass(frozen=True)
class KernelChoice:
    attention: str = "sdpa"
    layernorm: str = "torch"
    gelu: str = "torch"

    def __post_init__(self) -> None:
        for name, accepted in (("attention", ATTENTION), ("layernorm", LAYERNORM),
                               ("gelu", GELU)):
            if getattr(self, name) not in accepted:
                raise ValueError(f"kernels.{name}: {getattr(self, name)!r} is not one of "
                                 f"{', '.join(accepted)}")


def _triton_reason(device: torch.device) -> str | None:
    """None when Triton kernels can run for tensors on `device`, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    from deit_fast import kernels

    runnable, reason = kernels.triton_runnable(device)
    return None if runnable else reason


def resolve_kernels(attention: str = "auto", layernorm: str = "auto", gelu: str = "auto",
                    device: torch.device | str = "cpu") -> KernelChoice:
    """`auto` is Triton on CUDA and torch elsewhere; an impossible wish raises KernelUnavailable."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    wishes = {
        "attention": attention if attention != "auto" else ("triton" if on_cuda else "sdpa"),
        "layernorm": layernorm if layernorm != "auto" else ("triton" if on_cuda else "torch"),
        "gelu": gelu if gelu != "auto" else ("triton" if on_cuda else "torch"),
    }
    for name, impl in wishes.items():
        if impl == "triton":
            reason = _triton_reason(device)
            if reason is not None:
                raise KernelUnavailable(f"kernels.{name}=triton cannot run: {reason}. "
                                        f"Use kernels.{name}=auto or a torch implementation.")
    if wishes["layernorm"] == "apex" and importlib.util.find_spec("apex") is None:
        raise KernelUnavailable("kernels.layernorm=apex cannot run: apex is not installed. "
                                "Use kernels.layernorm=auto, triton or torch.")
    return KernelChoice(**wishes)


def attention(qkv: Tensor, num_heads: int, impl: str, scale: float | None = None) -> Tensor:
    """Packed qkv [B, N, 3*H*D] (timm's column layout) -> [B, N, H*D]; eager is the Triton
    kernel's own torch reference."""
    from deit_fast import kernels

    if impl == "triton":
        return kernels.attention(qkv, num_heads, scale)
    if impl == "eager":
        return kernels.attention_reference(qkv, num_heads, scale)
    batch, tokens, width = qkv.shape
    head_dim = width // (3 * num_heads)
    q, k, v = qkv.reshape(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(batch, tokens, num_heads * head_dim)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float, residual: Tensor | None,
               impl: str) -> tuple[Tensor, Tensor]:
    """s = x + residual (the new residual stream) and y = LayerNorm(s); returns (y, s). The
    torch implementation is the Triton kernel's own reference."""
    from deit_fast import kernels

    if impl == "triton":
        return kernels.layer_norm(x, weight, bias, eps, residual)
    if impl == "apex":
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine

        s = x if residual is None else x + residual
        return fused_layer_norm_affine(s, weight, bias, weight.shape, eps), s
    return kernels.layer_norm_reference(x, weight, bias, eps, residual)


def linear_bias_gelu(x: Tensor, weight: Tensor, bias: Tensor, impl: str) -> Tensor:
    """gelu(x @ weight.T + bias), exact erf GELU. Triton adds the bias inside its GELU kernel
    (whose reference is gelu(x + bias)); torch adds it inside the matmul (addmm), as timm's
    Mlp does, the fastest torch form of the same math."""
    if impl == "triton":
        from deit_fast import kernels

        return kernels.bias_gelu(F.linear(x, weight), bias)
    return F.gelu(F.linear(x, weight, bias))
