"""DeiT: a ViT with a class token and an optional distillation token (Touvron et al. 2021).

Parameter names and shapes are those of timm's VisionTransformer / the official DeiT
checkpoints, so their state dicts load unchanged. Attention, LayerNorm and GELU go
through deit_fast.ops, which decides the implementation.

The residual stream is carried as (x, pending): `pending` is the output of the last
branch, not yet added. Each LayerNorm adds it and normalises in one call, which is what
the fused Triton residual+LayerNorm kernel does in one pass over memory.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from deit_fast import ops


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero a sample's branch with probability `rate`, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class LayerNorm(nn.Module):
    """LayerNorm that first adds a pending residual: returns (LN(x + residual), x + residual)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.impl = "torch"

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return ops.layer_norm(x, self.weight, self.bias, self.eps, residual, self.impl)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.impl = "sdpa"

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(ops.attention(self.qkv(x), self.num_heads, self.impl))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.impl = "torch"

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(ops.linear_bias_gelu(x, self.fc1.weight, self.fc1.bias, self.impl))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: Tensor, pending: Tensor | None) -> tuple[Tensor, Tensor]:
        h, x = self.norm1(x, pending)
        h, x = self.norm2(x, drop_path(self.attn(h), self.drop_path, self.training))
        return x, drop_path(self.mlp(h), self.drop_path, self.training)


HEADS = ("class", "distillation", "joint")  # the heads of a distilled DeiT, at evaluation


class DeiT(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, num_classes: int = 1000,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 distilled: bool = False, in_chans: int = 3) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.num_classes, self.embed_dim, self.distilled = num_classes, embed_dim, distilled
        self.num_prefix_tokens = 2 if distilled else 1
        self.grid = img_size // patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.grid**2 + self.num_prefix_tokens, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear in depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.head_dist = nn.Linear(embed_dim, num_classes) if distilled else None
        self.eval_head = "joint"  # one of HEADS: what a distilled model predicts at evaluation
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) truncated at two standard deviations for tokens, position
        embedding and Linears; LayerNorms at identity, biases zero."""
        for p in (self.cls_token, self.dist_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                nn.init.zeros_(m.bias)
            elif isinstance(m, LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_kernels(self, choice: ops.KernelChoice) -> None:
        for m in self.modules():
            if isinstance(m, LayerNorm):
                m.impl = choice.layernorm
            elif isinstance(m, Attention):
                m.impl = choice.attention
            elif isinstance(m, Mlp):
                m.impl = choice.gelu

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "dist_token", "pos_embed"}

    def forward_features(self, images: Tensor) -> Tensor:
        """Normalised prefix tokens [B, prefix, C] (class, then distillation token)."""
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        prefix = [self.cls_token, self.dist_token] if self.distilled else [self.cls_token]
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1)
        x = x + self.pos_embed
        pending = None
        for block in self.blocks:
            x, pending = block(x, pending)
        n = self.num_prefix_tokens  # LayerNorm is per token: only the prefix feeds the heads
        y, _ = self.norm(x[:, :n], pending[:, :n])
        return y

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Class logits; a distilled model trains on (class, distillation) logits and is
        evaluated with `eval_head`: their mean (joint, the paper's), or either head alone."""
        tokens = self.forward_features(images)
        logits = self.head(tokens[:, 0])
        if not self.distilled:
            return logits
        dist_logits = self.head_dist(tokens[:, 1])
        if self.training:
            return logits, dist_logits
        return {"class": logits, "distillation": dist_logits,
                "joint": (logits + dist_logits) / 2}[self.eval_head]
