"""The linear (rectified-flow) path and the average-velocity parametrisation.

Noise z sits at t = 1, data x at t = 0:  x_t = t·z + (1 − t)·x,  v = dx_t/dt = z − x.
The network F(x_t, t, r) predicts the *average* velocity over [r, t], so a jump is
x_r = x_t − (t − r)·F. Negative time (the fake/"twin" branch) uses the same geometry
with |t|: only the conditioning signal differs (docs/METHOD.md §2).
"""

from __future__ import annotations

import torch


def expand_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] broadcastable against ``like`` ([B, ...])."""
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t·z + (1 − t)·x for t in [0, 1] (per row)."""
    tt = expand_time(t, x)
    return tt * z + (1 - tt) * x


def velocity(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Instantaneous velocity of the linear path (the flow-matching target): z − x."""
    return z - x


def endpoints(x_t: torch.Tensor, t: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert a prediction F at (x_t, t) to (x̂, ẑ); uses |t| so the fake branch shares the geometry.

    x̂ = x_t − |t|·F (exact data estimate when r = 0), ẑ = x_t + (1 − |t|)·F.
    """
    s = expand_time(t.abs(), x_t)
    return x_t - s * f, x_t + (1 - s) * f


def jump(x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """x_r = x_t − (t − r)·F: move along the predicted average velocity to time r."""
    return x_t - expand_time(t - r, x_t) * f
