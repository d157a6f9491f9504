"""Toy velocity networks F(x_t, t, r, cond) small enough for two CPU cores.

Both take *signed* t and r in [−1, 1]: the Fourier features below are odd in their sine
channels, so F(·, −τ, −τ) and F(·, τ, τ) see different inputs (the twin branch), exactly as
Qwen-Image's sinusoidal timestep embedder does at 20B.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FourierTime(nn.Module):
    """Signed scalar -> [sin(ω_k·t), cos(ω_k·t), t] with geometric frequencies ω_k ∈ [1, max_freq]."""

    def __init__(self, dim: int = 32, max_freq: float = 64.0):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(max_freq), half)), persistent=False)
        self.out_dim = 2 * half + 1

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a = t.float()[:, None] * self.freqs[None] * math.pi
        return torch.cat([a.sin(), a.cos(), t.float()[:, None]], dim=1)


class ToyMLP(nn.Module):
    """2-D (or any flat) data: an MLP on [x, Fourier(t), Fourier(r)]; optionally class-conditional."""

    def __init__(self, data_dim: int = 2, width: int = 256, depth: int = 4, num_classes: int = 0,
                 time_dim: int = 32):
        super().__init__()
        self.t_emb = FourierTime(time_dim)
        self.r_emb = FourierTime(time_dim)
        self.num_classes = num_classes
        cond_dim = 0
        if num_classes:
            self.label = nn.Embedding(num_classes, time_dim)
            cond_dim = time_dim
        layers: list[nn.Module] = []
        d_in = data_dim + 2 * self.t_emb.out_dim + cond_dim
        for i in range(depth):
            layers += [nn.Linear(d_in if i == 0 else width, width), nn.SiLU()]
        layers.append(nn.Linear(width, data_dim))
        self.net = nn.Sequential(*layers)

    @property
    def output_layer(self) -> nn.Module:
        """Last hidden state → velocity (its input is what DMD2's GAN head reads, method/dmd.py)."""
        return self.net[-1]

    def forward(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond=None) -> torch.Tensor:
        feats = [x.float(), self.t_emb(t), self.r_emb(r)]
        if self.num_classes:
            feats.append(self.label(cond))
        return self.net(torch.cat(feats, dim=1)).to(x.dtype)


class _ResBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mod = nn.Linear(emb_dim, 2 * width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.mod(emb).chunk(2, dim=1)
        y = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(nn.functional.silu(self.fc1(y)))


class DigitsNet(nn.Module):
    """Class-conditional residual MLP for flattened 8×8 digits (64-d), FiLM-conditioned on (t, r, class)."""

    def __init__(self, data_dim: int = 64, width: int = 256, depth: int = 4, num_classes: int = 10,
                 emb_dim: int = 128, time_dim: int = 64):
        super().__init__()
        self.t_emb = FourierTime(time_dim)
        self.r_emb = FourierTime(time_dim)
        self.label = nn.Embedding(num_classes, emb_dim)
        self.emb = nn.Sequential(nn.Linear(2 * self.t_emb.out_dim + emb_dim, emb_dim), nn.SiLU(),
                                 nn.Linear(emb_dim, emb_dim), nn.SiLU())
        self.inp = nn.Linear(data_dim, width)
        self.blocks = nn.ModuleList(_ResBlock(width, emb_dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, data_dim)

    @property
    def output_layer(self) -> nn.Module:
        """Last hidden state → velocity (its input is what DMD2's GAN head reads, method/dmd.py)."""
        return self.out

    def forward(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        emb = self.emb(torch.cat([self.t_emb(t), self.r_emb(r), self.label(cond)], dim=1))
        h = self.inp(x.float())
        for block in self.blocks:
            h = block(h, emb)
        return self.out(self.out_norm(h)).to(x.dtype)
