"""A Vision Transformer few-shot classifier: the backbone of the production presets, where
first-order meta-learning trains 1B-7B parameter models sharded across GPUs with FSDP.

Pre-LayerNorm blocks (attention + GELU MLP), a class token, learned position embeddings, and a
linear n_way head. Plain nn.Linear / nn.LayerNorm modules, so it runs through
`functional_call` and `vmap` like any user model, and `blocks` are the units FSDP shards."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


ATTENTION = ("sdpa", "math")


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, attention: str = "sdpa"):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if self.attention == "sdpa":
            attn = F.scaled_dot_product_attention(q, k, v)
        else:  # plain ops: differentiable twice (the fused SDPA kernels have no double backward)
            attn = torch.softmax(q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5), dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(B, S, D)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, *, in_channels: int, image_size: int, n_way: int, dim: int, depth: int, heads: int,
                 patch_size: int, mlp_ratio: int = 4, attention: str = "sdpa"):
        """attention: 'sdpa' (fused scaled_dot_product_attention: first-order methods, the sharded
        production presets) or 'math' (plain ops, for second-order MAML: the fused attention
        kernels cannot be differentiated twice)."""
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTION)}")
        if dim % heads:
            raise ValueError(f"ViT dim ({dim}) must be divisible by heads ({heads})")
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} must be a multiple of patch_size {patch_size}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        n_tokens = (image_size // patch_size) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, mlp_ratio, attention) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_way)
        for name, p in self.named_parameters():  # small init keeps deep residual stacks stable
            if name.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight", "head.weight")):
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * depth) if name.endswith(("proj.weight", "fc2.weight")) else 1))

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], 1) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens[:, 0]))


def vit_param_count(*, in_channels: int, image_size: int, n_way: int, dim: int, depth: int, heads: int = 1,
                    patch_size: int, mlp_ratio: int = 4) -> int:
    """Parameters of ViT(...) by formula (a test checks it against a built model)."""
    tokens = (image_size // patch_size) ** 2 + 1
    embed = in_channels * patch_size ** 2 * dim + dim + dim + tokens * dim
    block = 2 * 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + 2 * mlp_ratio * dim * dim + mlp_ratio * dim + dim
    return embed + depth * block + 2 * dim + dim * n_way + n_way
