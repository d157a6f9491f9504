"""MeanFlow and continuous-time consistency (sCM), JVP-free: two rivals on TwinFlow's (t, r) interface.

Both regress the network F(x_t, t, r) — the average velocity over [r, t], x_r = x_t − (t − r)·F, the
same contract TwinFlow trains — on a target built from F's own total time derivative along the flow,

    dF/dt = v·∂ₓF + ∂ₜF      (r held fixed, dx_t/dt = v),

which the papers compute with a Jacobian-vector product. Here it is a central finite difference of two
extra no-grad forward passes (``tangent``), as the TwinFlow paper ran both baselines at 20B: no JVP
support is needed from the model, FSDP/ZeRO or attention kernels (docs/METHOD.md §18).

  MeanFlow   the MeanFlow identity  u(x_t, r, t) = v − (t − r)·dF/dt : T = sg(v − (t − r)·dF/dt),
             (t, r) from a logit-normal, r = t on most rows (plain flow matching there); the loss is
             the paper's adaptive weight  ‖F − T‖² / sg(‖F − T‖² + c)^p.
  sCM        consistency along the flow at r = 0: f = x_t − t·F must not change with t, i.e.
             g = F − v + t·dF/dt = 0 — exactly MeanFlow's residual at r = 0. sCM's stabilisers are kept:
             the tangent t·dF/dt is warmed up (×min(1, step / warmup)) and g is normalised,
             g ← g / (‖g‖ + c), before the update F ← sg(F) − g.
v is the conditional velocity z − x (training from data, as both papers and TwinFlow do), or, with
``velocity: teacher``, the teacher's F(x_t, t, t) (consistency / mean-flow *distillation*).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from twinflow.config.errors import require
from twinflow.method.blocks import LossNorm
from twinflow.method.losses import per_sample_mse
from twinflow.method.objective import ObjectiveOutput, add_stat, row_rms
from twinflow.method.path import expand_time, interpolate, velocity
from twinflow.method.rows import rand, randn_like, select_rows
from twinflow.method.teacher import Teacher, VelocityFn


@dataclass
class TangentSettings:
    """What MeanFlow and sCM share: the time draw, the finite difference, where v comes from."""

    time_mu: float = -0.4
    time_sigma: float = 1.0
    """Times are logit-normal(μ, σ) draws."""
    fd_eps: float = 5e-3
    """Half-width of the central difference in t (bf16 models want ≥ 1e-3)."""
    velocity: Literal["data", "teacher"] = "data"

    def validate(self, path: str) -> None:
        require(self.time_sigma > 0, f"{path}.time_sigma", "must be positive")
        require(0 < self.fd_eps < 0.1, f"{path}.fd_eps", f"must be in (0, 0.1), got {self.fd_eps}")
        require(self.velocity in ("data", "teacher"), f"{path}.velocity", "choose data or teacher")


@dataclass
class MeanFlowConfig(TangentSettings):
    """MeanFlow (Geng et al. 2025) with a finite-difference tangent; defaults: the paper's ImageNet recipe.
    (t, r) is a sorted pair of time draws."""

    name: Literal["meanflow"] = "meanflow"
    unequal_ratio: float = 0.25
    """Share of rows with r ≠ t; the rest are flow-matching rows (r = t)."""
    adaptive_p: float = 1.0
    """Loss ‖Δ‖²/sg(‖Δ‖² + c)^p; p = 0 is plain l2."""
    adaptive_c: float = 1e-3

    def validate(self, path: str = "meanflow") -> None:
        super().validate(path)
        require(0 <= self.unequal_ratio <= 1, f"{path}.unequal_ratio", "must be in [0, 1]")
        require(self.adaptive_p >= 0 and self.adaptive_c > 0, f"{path}.adaptive_p",
                "needs p >= 0 and adaptive_c > 0")


@dataclass
class SCMConfig(TangentSettings):
    """Continuous-time consistency (Lu & Song 2024) at r = 0 with a finite-difference tangent."""

    name: Literal["scm"] = "scm"
    tangent_warmup: int = 1000
    """Optimizer steps over which the t·dF/dt term ramps from 0 to 1 (0: no warm-up)."""
    tangent_norm_c: float = 0.1
    """g ← g / (‖g‖_rms + c); 0 disables the normalisation."""

    def validate(self, path: str = "scm") -> None:
        super().validate(path)
        require(self.tangent_warmup >= 0, f"{path}.tangent_warmup", "must be >= 0")
        require(self.tangent_norm_c >= 0, f"{path}.tangent_norm_c", "must be >= 0")


def logit_normal(n: int, mu: float, sigma: float, generator: torch.Generator | None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    z = torch.randn(n, generator=generator, device=device)
    return torch.sigmoid(mu + sigma * z)


@torch.no_grad()
def tangent(net: VelocityFn, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, v: torch.Tensor, cond: Any,
            eps: float) -> torch.Tensor:
    """dF/dt along the flow (dx/dt = v, r fixed) by a central difference, one-sided at the ends:
    t± = t ± eps clamped to [0, 1], x± = x_t + (t± − t)·v,  dF/dt ≈ (F(x₊, t₊, r) − F(x₋, t₋, r)) / (t₊ − t₋).
    Exact for a network linear in (x, t). t₋ may fall below r: F is smooth there, and the difference
    must keep its width (a step clamped to r would vanish on the diagonal)."""
    t_hi = (t + eps).clamp(max=1.0)
    t_lo = (t - eps).clamp(min=0.0)
    x_hi = x_t + expand_time(t_hi - t, x_t) * v
    x_lo = x_t + expand_time(t_lo - t, x_t) * v
    dx = net(x_hi.to(x_t.dtype), t_hi, r, cond).float() - net(x_lo.to(x_t.dtype), t_lo, r, cond).float()
    return dx / expand_time(t_hi - t_lo, dx)


def meanflow_target(v: torch.Tensor, t: torch.Tensor, r: torch.Tensor, dfdt: torch.Tensor) -> torch.Tensor:
    """The MeanFlow identity's right-hand side: v − (t − r)·dF/dt."""
    return v - expand_time(t - r, v) * dfdt


def adaptive_loss(f: torch.Tensor, target: torch.Tensor, p: float, c: float) -> torch.Tensor:
    """‖F − T‖² / sg(‖F − T‖² + c)^p per row (MeanFlow's adaptive weight; p = 1 ≈ unit-norm gradients)."""
    m = per_sample_mse(f, target)
    return m / (m.detach() + c).pow(p) if p > 0 else m


class _TangentObjective:
    """Shared call: draw (t, r), noise, one gradient pass, the tangent, the loss. ``step`` (the optimizer
    step, for sCM's warm-up) is set by the trainer through ``set_step``."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.step = 0

    def set_step(self, step: int) -> None:
        self.step = step

    @torch.no_grad()
    def _noised(self, x: torch.Tensor, t: torch.Tensor, cond: Any, teacher: Teacher | None,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t = t·z + (1 − t)·x and its velocity v: z − x, or the teacher's F(x_t, t, t)."""
        data = x.float()
        z = randn_like(data, generator)
        x_t = interpolate(data, z, t)
        if self.cfg.velocity == "data":
            return x_t, velocity(data, z)
        if teacher is None:
            raise ValueError(f"{self.cfg.name}.velocity: teacher needs a teacher network")
        return x_t, teacher.velocity(x_t, t, t, cond).float()


class MeanFlowObjective(_TangentObjective):
    def __call__(self, model: VelocityFn, x: torch.Tensor, cond: Any, block_ids: torch.Tensor | None = None, *,
                 uncond: Any = None, teacher: Teacher | None = None, model_nograd: VelocityFn | None = None,
                 generator: torch.Generator | None = None, norm: LossNorm | None = None) -> ObjectiveOutput:
        cfg, n, dev = self.cfg, x.shape[0], x.device
        raw = model_nograd or model
        rows = norm.rows if norm is not None else n
        with torch.no_grad():
            a = logit_normal(n, cfg.time_mu, cfg.time_sigma, generator, dev)
            b = logit_normal(n, cfg.time_mu, cfg.time_sigma, generator, dev)
            t, r = torch.maximum(a, b), torch.minimum(a, b)
            equal = rand(n, generator, dev) >= cfg.unequal_ratio
            r = torch.where(equal, t, r)
        x_t, v = self._noised(x, t, cond, teacher, generator)
        f = model(x_t.to(x.dtype), t, r, cond).float()
        with torch.no_grad():
            target = v.clone()
            far = ~equal
            if far.any():
                idx = far.nonzero().squeeze(1)
                d = tangent(raw, x_t[idx], t[idx], r[idx], v[idx], select_rows(cond, idx), cfg.fd_eps)
                target[idx] = meanflow_target(v[idx], t[idx], r[idx], d)
        per_row = adaptive_loss(f, target, cfg.adaptive_p, cfg.adaptive_c)
        loss = per_row.sum() / rows
        stats: dict = {}
        add_stat(stats, "loss/meanflow", per_row.detach().sum(), n)
        add_stat(stats, "loss/total", loss.detach())
        return ObjectiveOutput(loss=loss, stats=stats)


class SCMObjective(_TangentObjective):
    def __call__(self, model: VelocityFn, x: torch.Tensor, cond: Any, block_ids: torch.Tensor | None = None, *,
                 uncond: Any = None, teacher: Teacher | None = None, model_nograd: VelocityFn | None = None,
                 generator: torch.Generator | None = None, norm: LossNorm | None = None) -> ObjectiveOutput:
        cfg, n, dev = self.cfg, x.shape[0], x.device
        raw = model_nograd or model
        rows = norm.rows if norm is not None else n
        with torch.no_grad():
            t = logit_normal(n, cfg.time_mu, cfg.time_sigma, generator, dev)
            r = torch.zeros_like(t)
        x_t, v = self._noised(x, t, cond, teacher, generator)
        f = model(x_t.to(x.dtype), t, r, cond).float()
        with torch.no_grad():
            d = tangent(raw, x_t, t, r, v, cond, cfg.fd_eps)
            g = scm_residual(f.detach(), v, t, d, self.warmup_factor())
            g_norm = row_rms(g)
            if cfg.tangent_norm_c > 0:
                g = g / expand_time(g_norm + cfg.tangent_norm_c, g)
            target = f.detach() - g
        per_row = per_sample_mse(f, target)
        loss = per_row.sum() / rows
        stats: dict = {}
        add_stat(stats, "loss/scm", per_row.detach().sum(), n)
        add_stat(stats, "tangent_norm", g_norm.sum(), n)
        add_stat(stats, "loss/total", loss.detach())
        return ObjectiveOutput(loss=loss, stats=stats)

    def warmup_factor(self) -> float:
        w = self.cfg.tangent_warmup
        return 1.0 if w == 0 else min(1.0, (self.step + 1) / w)


def scm_residual(f: torch.Tensor, v: torch.Tensor, t: torch.Tensor, dfdt: torch.Tensor,
                 warmup: float = 1.0) -> torch.Tensor:
    """g = F − v + warmup·t·dF/dt: −d/dt of the consistency function f = x_t − t·F, up to the warm-up."""
    return f - v + warmup * expand_time(t, f) * dfdt

