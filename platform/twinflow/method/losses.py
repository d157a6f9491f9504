"""Per-sample losses and the (t, r) time weight (docs/METHOD.md §11)."""

from __future__ import annotations

import math

import torch


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every non-batch dimension: [B, ...] -> [B]."""
    return (pred - target).pow(2).flatten(1).mean(1)


BARRON_EPS = 1e-8
"""Added to c² in Barron's weight, as the released code does (0.5 % of c² at c = 1e-3)."""


def barron(pred: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, c: float = 1e-3) -> torch.Tensor:
    """The reference's "barron_reweighting": an adaptive, stop-gradient weight on the per-sample MSE.

    weight = sg((m/(c² + 1e-8) / |α − 2| + 1)^((α − 2)/2)),  ℓ = m·weight / c.
    For α = 1 and m ≫ c² this is ≈ √m (per-sample RMSE): every sample's gradient is normalised
    to unit RMS, so no row dominates however far it is from its target. On a multimodal target
    (several v for one x_t) that makes the minimiser a geometric median, not the mean E[v | x_t]
    flow matching needs: docs/METHOD.md §11 (and ``BlockLoss`` to use l2 on a block).
    """
    m = per_sample_mse(pred, target)
    weight = ((m.detach() / (c**2 + BARRON_EPS)) / abs(alpha - 2) + 1).pow((alpha - 2) / 2)
    return m * weight / c


def sample_loss(kind: str, pred: torch.Tensor, target: torch.Tensor, barron_alpha: float = 1.0,
                barron_c: float = 1e-3) -> torch.Tensor:
    if kind == "l2":
        return per_sample_mse(pred, target)
    if kind == "barron":
        return barron(pred, target, barron_alpha, barron_c)
    raise ValueError(f"unknown loss {kind!r}")


def time_weight(t: torch.Tensor, r: torch.Tensor, kind: str) -> torch.Tensor:
    """ω(t, r) = 1 + tan((1 − (|t| − |r|))·π/2.5): 1 for a full jump, ≈ 4.08 on the diagonal."""
    if kind == "none":
        return torch.ones_like(t)
    if kind == "tan":
        return 1 + torch.tan((1 - (t.abs() - r.abs())) * math.pi / 2.5)
    raise ValueError(f"unknown time weight {kind!r}")
