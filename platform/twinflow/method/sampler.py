"""The any-step sampler: one TwinFlow checkpoint serves 1, 2, 4 or N NFE (docs/METHOD.md §15).

Grid: u = linspace(a, 1 − b, K) (K + 1 points with the last dropped when b = 0), warped by
Kumaraswamy u ↦ (1 − (1 − u^p)^q)^s, t_i = 1 − u_i, then 0 appended.
Step t_i → t_{i+1}: F = F(x, t_i, r), x̂ = x − t_i·F, ẑ = x + (1 − t_i)·F,
x ← (1 − t_{i+1})·x̂ + t_{i+1}·(√(1 − ρ)·ẑ + √ρ·ε).
ρ = 0 is deterministic (DDIM-like); ρ = 1 re-noises fully (consistency style).
Target time per style: few r = 0, any r = t_{i+1}, mul r = t_i (the classic velocity ODE;
with ρ = 0 it is exactly Euler). State is kept in float64 between calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from twinflow.config.errors import require
from twinflow.method.teacher import VelocityFn


@dataclass
class SamplerConfig:
    steps: int = 2
    gap: tuple[float, float] = (0.001, 0.6)
    """(a, b): the grid spans u ∈ [a, 1 − b] before warping; t starts at 1 − a."""
    kumaraswamy: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """(p, q, s) of the warp; (1, 1, 1) is the identity."""
    stochastic_ratio: float = 1.0
    """ρ ∈ [0, 1]."""
    style: Literal["few", "any", "mul"] = "few"

    def validate(self, path: str = "sampler") -> None:
        require(self.steps >= 1, f"{path}.steps", f"must be >= 1, got {self.steps}")
        a, b = self.gap
        require(0 <= a < 1 and 0 <= b < 1 and a <= 1 - b, f"{path}.gap", f"need 0 <= a <= 1 − b < 1, got {self.gap}")
        require(0 <= self.stochastic_ratio <= 1, f"{path}.stochastic_ratio", "must be in [0, 1]")
        require(all(v > 0 for v in self.kumaraswamy), f"{path}.kumaraswamy", "p, q, s must be positive")


# Released Qwen-Image settings (docs/METHOD.md §15) and a many-step ODE reference.
DEFAULT_STEPS = 2  # NFE an exported pipeline samples with by default: the released recommendation (2-4)
PRESET_STEPS = (1, 2, 4)  # NFE values a pipeline folder carries presets for, as released


def few_step(steps: int) -> SamplerConfig:
    """1/2/4 NFE as released: r = 0, ρ = 1; gap (0.001, 0.6) for ≤ 2 steps, (0.001, 0.5) beyond."""
    return SamplerConfig(steps=steps, gap=(0.001, 0.6 if steps <= 2 else 0.5), stochastic_ratio=1.0, style="few")


def ode(steps: int) -> SamplerConfig:
    """Deterministic Euler on the instantaneous velocity (r = t), the flow-matching reference."""
    return SamplerConfig(steps=steps, gap=(0.001, 0.0), stochastic_ratio=0.0, style="mul")


def mean_flow(steps: int) -> SamplerConfig:
    """MeanFlow's sampler: uniform grid from t = 1, each step a jump along the average velocity to the next
    time (r = t_next), no re-noising: x ← x − (t_i − t_{i+1})·F(x, t_i, t_{i+1})."""
    return SamplerConfig(steps=steps, gap=(0.0, 0.0), stochastic_ratio=0.0, style="any")


def method_sampler(method: str, steps: int) -> SamplerConfig:
    """The few-step sampler a trained method is meant to be sampled with: MeanFlow's own jumps, else the
    released TwinFlow grid (predict the data at r = 0 and re-noise: multistep consistency sampling, which
    is also how sCM and one-step distilled students sample)."""
    return mean_flow(steps) if method == "meanflow" else few_step(steps)


RIVAL_PRESET_STEPS = (1, 2, 4, 8)
"""NFE values a rival's exported pipeline carries presets for: the paper compares sCM / MeanFlow at 8."""


def time_grid(cfg: SamplerConfig) -> torch.Tensor:
    """Descending float64 grid [t_0, ..., t_K = 0] with K = cfg.steps."""
    a, b = cfg.gap
    k = cfg.steps
    if b != 0:
        u = torch.linspace(a, 1 - b, k, dtype=torch.float64)
    else:
        u = torch.linspace(a, 1.0, k + 1, dtype=torch.float64)[:-1]
    p, q, s = cfg.kumaraswamy
    u = (1 - (1 - u.pow(p)).pow(q)).pow(s)
    return torch.cat([1 - u, torch.zeros(1, dtype=torch.float64)])


def _noise_like(x: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator])
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def sample(net: VelocityFn, noise: torch.Tensor, cond: Any, cfg: SamplerConfig,
           generator: torch.Generator | list[torch.Generator] | None = None,
           model_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Integrate from ``noise`` (t = 1) to data; returns float32. Deterministic given ``generator``.

    A list of generators (one per row) makes each row's re-noising depend on its own seed only,
    so an image does not change with the batch it is generated in.
    """
    grid = time_grid(cfg)
    dtype = model_dtype or noise.dtype
    x = noise.to(torch.float64)
    n = x.shape[0]
    rho = cfg.stochastic_ratio
    for i in range(cfg.steps):
        ti, tn = float(grid[i]), float(grid[i + 1])
        r = {"few": 0.0, "any": tn, "mul": ti}[cfg.style]
        tv = torch.full((n,), ti, device=x.device, dtype=torch.float32)
        rv = torch.full((n,), r, device=x.device, dtype=torch.float32)
        f = net(x.to(dtype), tv, rv, cond).to(torch.float64)
        x_hat = x - ti * f
        z_hat = x + (1 - ti) * f
        if rho > 0 and tn > 0:
            eps = _noise_like(x, generator)
            z_hat = (1 - rho) ** 0.5 * z_hat + rho**0.5 * eps
        x = (1 - tn) * x_hat + tn * z_hat
    return x.float()
