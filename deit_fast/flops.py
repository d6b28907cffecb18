"""Model FLOPs utilisation: the matmul FLOPs of one training step per image, and the peak.

FLOPs per image for one training step (a multiply-add is 2 FLOPs; LayerNorm, GELU,
softmax and the optimizer are not counted), with C the width, L the depth, H the MLP
hidden width, N the tokens (patches P plus class/distillation tokens), p the patch size:
    forward = 2*P*3*p^2*C                    patch embedding
            + L*(2*N*C*(4*C + 2*H)           qkv, proj, fc1, fc2
                 + 4*N^2*C)                  q@k^T and attn@v
            + 2*C*classes*heads              classifier head(s)
    step    = 3 * forward - 2*P*3*p^2*C      backward is twice the forward, except that
                                             the images need no gradient
DeiT-Ti/S/B: 7.5, 27.5 and 105 GFLOPs a step per image (1.3, 4.6, 17.6 GMACs forward).
timm's VisionTransformer of the same name is the same network and has the same count.
MFU = FLOPs per image * images/s / peak FLOP/s.
"""

from __future__ import annotations

import torch
from torch import nn

from deit_fast.models import DeiT

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of the GPUs we run on, by name part.
KNOWN_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def train_flops_per_image(model: nn.Module) -> float | None:
    """The module docstring's count, read off a DeiT's shapes; None for any other model."""
    if not isinstance(model, DeiT):
        return None
    c, p = model.embed_dim, model.patch_size
    patches = model.grid**2
    tokens = patches + model.num_prefix_tokens
    hidden = model.blocks[0].mlp.fc1.out_features
    heads = 2 if model.distilled else 1
    patch_embed = 2 * patches * 3 * p * p * c
    blocks = len(model.blocks) * (2 * tokens * c * (4 * c + 2 * hidden) + 4 * tokens**2 * c)
    forward = patch_embed + blocks + 2 * c * model.num_classes * heads
    return float(3 * forward - patch_embed)


def peak_tflops(device: torch.device, configured: float | None = None) -> float | None:
    """train.peak_tflops when set, else the known peak of this GPU, else None (e.g. a CPU)."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in KNOWN_PEAK_TFLOPS.items() if part in name), None)


def mfu(flops_per_image: float | None, images_per_s: float, peak: float | None) -> float | None:
    """The fraction of the peak the step's matmuls use; None when either count is unknown."""
    if flops_per_image is None or peak is None:
        return None
    return flops_per_image * images_per_s / (peak * 1e12)
