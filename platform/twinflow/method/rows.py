"""Row selection on conditions and seeded random draws, shared by the objective and the sampler.

A condition is any pytree whose tensors have the batch first: None (unconditional), a
tensor of class labels, a tuple/list, or a dict such as {"prompt_embeds": [B, L, D],
"prompt_mask": [B, L]}. The method never looks inside it; it only selects rows.
"""

from __future__ import annotations

from typing import Any

import torch


def select_rows(cond: Any, rows: torch.Tensor) -> Any:
    """cond restricted to ``rows`` (a bool mask or an index tensor) on every batch-first tensor."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[rows]
    if isinstance(cond, dict):
        return {k: select_rows(v, rows) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(select_rows(v, rows) for v in cond)
    raise TypeError(f"cannot select rows of a condition of type {type(cond).__name__}")


def cat_rows(cond: Any, more: Any) -> Any:
    """The rows of ``cond`` followed by those of ``more`` (same structure), for one network call over
    two sets of rows."""
    return _rowwise(cond, more, lambda a, b: torch.cat([a, b], dim=0), "concatenate")


def mix_rows(cond: Any, other: Any, rows: torch.Tensor) -> Any:
    """cond with the rows in ``rows`` (bool mask [B]) taken from ``other`` (same structure, same batch)."""
    def take(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(rows.reshape(-1, *([1] * (a.dim() - 1))).to(a.device), b, a)
    return _rowwise(cond, other, take, "mix")


def _rowwise(cond: Any, other: Any, combine, what: str) -> Any:
    """``combine(a, b)`` on every pair of batch-first tensors of two conditions of the same structure.
    Sequence tensors ([B, L, ...]) of different lengths are zero-padded to the longer one first, so a
    padded prompt embedding and its mask (0 = padding) stay a valid pair for either source."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        a, b = cond, other.to(cond.dtype)
        if a.dim() >= 2 and a.shape[1] != b.shape[1]:
            length = max(a.shape[1], b.shape[1])
            a, b = _pad_dim1(a, length), _pad_dim1(b, length)
        return combine(a, b)
    if isinstance(cond, dict):
        return {k: _rowwise(v, other[k], combine, what) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_rowwise(v, o, combine, what) for v, o in zip(cond, other))
    raise TypeError(f"cannot {what} rows of a condition of type {type(cond).__name__}")


def _pad_dim1(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[1] == length:
        return x
    pad = x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])
    return torch.cat([x, pad], dim=1)


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def rand(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device)


def sample_gamma(shape: int, alpha: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Marsaglia–Tsang Gamma(alpha, 1) draws from a seeded generator (torch's own takes none)."""
    boost = alpha < 1
    a = alpha + 1 if boost else alpha
    d = a - 1 / 3
    c = 1 / (9 * d) ** 0.5
    out = torch.empty(shape, device=device)
    todo = torch.ones(shape, dtype=torch.bool, device=device)
    while todo.any():
        n = int(todo.sum())
        xn = torch.randn(n, generator=generator, device=device)
        u = torch.rand(n, generator=generator, device=device)
        v = (1 + c * xn) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-30)) < 0.5 * xn**2 + d - d * v + d * torch.log(v.clamp_min(1e-30)))
        idx = todo.nonzero().squeeze(1)[ok]
        out[idx] = (d * v)[ok]
        todo[idx] = False
    if boost:
        out = out * torch.rand(shape, generator=generator, device=device) ** (1 / alpha)
    return out


def sample_time(n: int, dist: tuple[float, float, float], generator: torch.Generator | None,
                device: torch.device) -> torch.Tensor:
    """t ~ clamp(Beta(a, b), 0, 1)·scale; (1, 1, 1) is U(0, 1)."""
    a, b, scale = dist
    if a == 1 and b == 1:
        t = rand(n, generator, device)
    else:
        ga = sample_gamma(n, a, generator, device)
        gb = sample_gamma(n, b, generator, device)
        t = ga / (ga + gb)
    return t.clamp(0, 1) * scale
