"""Sinusoidal time embedding (Vaswani et al. 2017, used by Ho et al. 2020) and the time MLP."""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Embed integer timesteps as sines and cosines of geometrically spaced frequencies:

        emb(t)[i]          = sin(t * w_i),   i = 0 .. half-1
        emb(t)[half + i]   = cos(t * w_i),   w_i = max_period^(-i / half),  half = dim // 2

    t: (B,) integer or float tensor. Returns (B, dim) float32.

    sin and cos are concatenated, not interleaved: the network sees the same
    information either way, and the two halves read more clearly in a heatmap.
    For odd ``dim`` one zero column is appended. The original tutorial returned
    2 * (dim // 2) = dim - 1 columns there, and the next Linear layer failed.
    (The exponent i / half is the Transformer's; the DDPM paper's released code uses
    i / (half - 1). Both are valid: a checkpoint needs the one it was trained with.)
    """
    if not isinstance(t, torch.Tensor) or t.ndim != 1:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"t must be a tensor of shape (B,), got {shape}")
    if dim < 2:
        raise ValueError(f"embedding dim must be >= 2, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device,
                                                           dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]          # (B, half)
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)  # (B, 2 * half)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(t.shape[0], 1)], dim=1)  # (B, dim)
    return emb


class TimeEmbedding(nn.Module):
    """t -> sinusoidal(t, base_dim) -> Linear -> SiLU -> Linear: (B,) -> (B, out_dim).

    The MLP lets the network learn its own features of t from the fixed sinusoids.
    """

    def __init__(self, base_dim: int, out_dim: int):
        super().__init__()
        self.base_dim = base_dim
        self.mlp = nn.Sequential(nn.Linear(base_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.base_dim))


def seed_tutorial_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The original tutorial's embedding, kept only to show its bug (chapters 2 and 7).

    It concatenates sin and cos of ``dim // 2`` frequencies and stops there, so an odd
    ``dim`` yields dim - 1 columns: that is the bug. Its exponent i / (half - 1) is the
    convention of the paper's own released code (not a bug), which divides by zero for
    dim = 2 or 3, a size no real network uses. Use :func:`sinusoidal_embedding`.
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)   # (B, 2 * (dim // 2)): one short when dim is odd
