"""Brain encoder: a pre-norm transformer over time with ScaleNorm and rotary positions.

Each block is an attention sub-layer and a feed-forward sub-layer, both computed as
``x = f(ScaleNorm(x)) + x * residual_scale``; a final ScaleNorm follows the last block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ScaleNorm(nn.Module):
    """``x / max(||x||, eps) * sqrt(dim) * (1 + g)`` with one learned scalar ``g`` (init 0)."""

    def __init__(self, dim: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.scale = math.sqrt(dim)
        self.eps = eps
        self.g = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1, eps=self.eps) * self.scale * (1 + self.g)  # (..., dim)


class Rotary(nn.Module):
    """Rotary positions on the first ``dim_head // 2`` channels, rotating interleaved pairs.

    The angle of position ``t`` on the pair ``(2j, 2j + 1)`` is ``t * base ** (-2j / rot)``;
    the remaining channels pass through unchanged.
    """

    def __init__(self, dim_head: int, base: float) -> None:
        super().__init__()
        self.rot = dim_head // 2
        self.base = base

    def inv_freq(self) -> Tensor:
        """``(ceil(rot / 2),)`` float32 frequencies."""
        return 1.0 / (self.base ** (torch.arange(0, self.rot, 2).float() / self.rot))

    def angles(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin, each ``(n, 2 * len(inv_freq))``, in float32 or wider."""
        dtype = torch.promote_types(dtype, torch.float32)
        inv_freq = self.inv_freq().to(device=device, dtype=dtype)
        t = torch.arange(n, device=device, dtype=dtype)
        freqs = torch.outer(t, inv_freq).repeat_interleave(2, dim=-1)  # (n, rot_channels)
        return freqs.cos(), freqs.sin()

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate ``x`` ``(B, heads, T, dim_head)``; ``cos``/``sin`` ``(T, rot_channels)``."""
        n = cos.shape[-1]
        x_rot, x_pass = x[..., :n].to(cos.dtype), x[..., n:]
        pairs = x_rot.unflatten(-1, (-1, 2))  # (B, h, T, n/2, 2)
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (B, h, T, n)
        x_rot = x_rot * cos + rotated * sin
        return torch.cat((x_rot.to(x.dtype), x_pass), dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention without biases; rotary on q and k."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dropout = dropout
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``(B, T, dim)`` -> ``(B, T, dim)``."""
        B, T, _ = x.shape
        q, k, v = (
            proj(x).view(B, T, self.heads, -1).transpose(1, 2)  # (B, h, T, dh)
            for proj in (self.to_q, self.to_k, self.to_v)
        )
        q, k = Rotary.rotate(q, cos, sin), Rotary.rotate(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0
        )  # (B, h, T, dh)
        return self.to_out(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)


class FeedForward(nn.Module):
    """``Linear -> GELU (erf) -> Dropout -> Linear``, with biases."""

    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * mult)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(dim * mult, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x))))  # (B, T, dim)


class EncoderBlock(nn.Module):
    """Attention then feed-forward, each pre-ScaleNormed, with a learned skip scale."""

    def __init__(self, dim: int, heads: int, ff_mult: int, attn_dropout: float, ff_dropout: float) -> None:
        super().__init__()
        self.attn_norm = ScaleNorm(dim)
        self.attn = Attention(dim, heads, dim // heads, attn_dropout)
        self.attn_residual_scale = nn.Parameter(torch.ones(dim))
        self.ff_norm = ScaleNorm(dim)
        self.ff = FeedForward(dim, ff_mult, ff_dropout)
        self.ff_residual_scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``(B, T, dim)`` -> ``(B, T, dim)``."""
        x = self.attn(self.attn_norm(x), cos, sin) + x * self.attn_residual_scale
        return self.ff(self.ff_norm(x)) + x * self.ff_residual_scale


class BrainEncoder(nn.Module):
    """Learned time positions, ``depth`` encoder blocks and a final ScaleNorm."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        ff_mult: int,
        attn_dropout: float,
        ff_dropout: float,
        max_time_len: int,
        time_init_std: float,
        rotary_base: float,
    ) -> None:
        super().__init__()
        self.time_pos_embed = nn.Parameter(torch.empty(1, max_time_len, dim))
        self.rotary = Rotary(dim // heads, rotary_base)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, ff_mult, attn_dropout, ff_dropout) for _ in range(depth))
        self.final_norm = ScaleNorm(dim)
        nn.init.normal_(self.time_pos_embed, std=time_init_std)

    @property
    def max_time_len(self) -> int:
        return self.time_pos_embed.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, dim)`` -> ``(B, T, dim)``; ``T <= max_time_len``."""
        T = x.shape[1]
        if T > self.max_time_len:
            raise ValueError(f"{T} frames exceed model.max_time_len={self.max_time_len}")
        x = x + self.time_pos_embed[:, :T]  # (B, T, dim)
        cos, sin = self.rotary.angles(T, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.final_norm(x)
