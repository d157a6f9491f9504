"""The TwinFlow objective: L_base (RCGM any-step) + L_TwinFlow (L_adv + L_rectify) in one batch.

One call = one micro-batch. Each row carries a block id (blocks.py) that decides its (t, r)
and its loss:

  ONE_STEP   (1, 0)        RCGM target at (1, 0) [one_step_rcgm]  + dmc·L_rectify
  NEAR_DIAG  r ≈ t         RCGM target (flow matching when t − r < δ)
  ANY_STEP   r ~ U(0, t)   RCGM target
  FAKE       (−τ, −τ)      L_adv: flow matching toward detached one-step fakes
  (optional) every real row again at (t, t): w·ℓ(F, v), the tutorial's real-velocity term

The network is called once with gradient, on the whole micro-batch; every other call (fake
generation, CFG teacher, RCGM rollout, Δv) runs under no_grad. Loss per row is
ω(t, r)·ℓ(F, T); see losses.py. The returned loss is normalised by ``LossNorm`` so that the
micro-batches of one optimizer step add up to the global-batch mean (blocks.LossNorm).
Nothing here imports torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from twinflow.method.blocks import BLOCK_NAMES, Block, LossNorm
from twinflow.method.config import TwinFlowConfig
from twinflow.method.losses import sample_loss, time_weight
from twinflow.method.path import endpoints, expand_time, interpolate, velocity
from twinflow.method.rows import cat_rows, mix_rows, rand, randn_like, sample_time, select_rows
from twinflow.method.teacher import SelfTeacher, Teacher, VelocityFn


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    """Scalar to backpropagate (already normalised for the global batch)."""
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """name -> (sum, count), detached: add across ranks, then divide, for exact global means."""

    def means(self) -> dict[str, float]:
        return {k: float(s) / float(c) for k, (s, c) in self.stats.items() if float(c) > 0}


# ---------------------------------------------------------------------------
# pure pieces (unit-tested on their own)
# ---------------------------------------------------------------------------


def rcgm_target(f: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, v: torch.Tensor,
                rollout: VelocityFn, cond: Any, delta: float, order: int, clip: float | None,
                clip_rows: torch.Tensor | None = None) -> torch.Tensor:
    """T = sg(F) − clip(Φ): the RCGM regression target (docs/METHOD.md §8).

    Φ = F − v where t − r < δ (flow matching), else Φ = [(t − r)·F − D − δ·v]/δ with D the
    displacement of an ``order``-step rollout of ``rollout`` from s = t − δ, x_s = x_t − δ·v, to r.
    All tensors are fp32 and detached; the gradient of ℓ(F, T) w.r.t. F is ∝ clip(Φ).
    ``clip_rows`` (bool [B]): clip only those rows' Φ (BlockLoss.clip); None: every row.
    """
    phi = f - v
    far = (t - r) >= delta
    if far.any():
        idx = far.nonzero().squeeze(1)
        tf, rf, vf, ff = t[idx], r[idx], v[idx], f[idx]
        cf = select_rows(cond, idx)
        s = tf - delta
        y = x_t[idx] - delta * vf
        disp = torch.zeros_like(y)
        for k in range(order):
            u0 = s + (rf - s) * (k / order)
            u1 = s + (rf - s) * ((k + 1) / order)
            d = rollout(y, u0, u1, cf).to(f.dtype)
            step = expand_time(u0 - u1, y) * d
            y = y - step
            disp = disp + step
        phi[idx] = (expand_time(tf - rf, ff) * ff - disp - delta * vf) / delta
    if clip is not None:
        clipped = phi.clamp(-clip, clip)
        phi = clipped if clip_rows is None else torch.where(clip_rows.reshape(-1, *[1] * (phi.dim() - 1)), clipped, phi)
    return f - phi


def rectify_delta(net: VelocityFn, x_fake: torch.Tensor, cond: Any, clip: float | None,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Δv = clip(F(y, −τ, −τ) − F(y, τ, τ)) at y = τ·z'' + (1 − τ)·x_fake, τ ~ U(0, 1) (docs/METHOD.md §10)."""
    tau = rand(x_fake.shape[0], generator, x_fake.device)
    y = interpolate(x_fake, randn_like(x_fake, generator), tau)
    dv = (net(y, -tau, -tau, cond).float() - net(y, tau, tau, cond).float())
    return dv.clamp(-clip, clip) if clip is not None else dv


def rectify_target(f_one: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """sg(F₁ − Δv): descending ℓ(F₁, ·) moves F₁ by −Δv, i.e. x_fake = z − F₁ by +Δv."""
    return (f_one - dv).detach()


# ---------------------------------------------------------------------------
# the objective
# ---------------------------------------------------------------------------


class TwinFlowObjective:
    def __init__(self, cfg: TwinFlowConfig):
        self.cfg = cfg

    def __call__(self, model: VelocityFn, x: torch.Tensor, cond: Any, block_ids: torch.Tensor, *,
                 uncond: Any = None, teacher: Teacher | None = None, model_nograd: VelocityFn | None = None,
                 generator: torch.Generator | None = None, norm: LossNorm | None = None) -> ObjectiveOutput:
        """Loss of one micro-batch.

        model         the trained network F(x_t, t, r, cond), possibly DDP/DeepSpeed-wrapped;
                      called exactly once, with gradient.
        x             real data (latents) [B, ...], fp32.
        cond/uncond   conditions (rows.py); ``uncond`` is needed only when enhance_ratio > 0.
        block_ids     LongTensor [B] of Block ids (blocks.allocate_micro_batch).
        teacher       f̄; defaults to the online network without grad (self teacher).
        model_nograd  same weights without wrappers for the no-grad passes (defaults to ``model``).
        """
        cfg = self.cfg
        raw: Callable = model_nograd or model
        teacher = teacher or SelfTeacher(raw)
        norm = norm or LossNorm.local(block_ids)
        dev, n = x.device, x.shape[0]
        block_ids = block_ids.to(dev)
        one, near, anyb, fake = (block_ids == b for b in Block)
        real = ~fake
        stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        if cfg.cond_dropout > 0:
            if uncond is None:
                raise ValueError("twinflow.cond_dropout > 0 needs the unconditional condition (uncond)")
            # Every later use (rollouts, the enhancement's conditional pass) sees the dropped condition too.
            cond = mix_rows(cond, uncond, real & (rand(n, generator, dev) < cfg.cond_dropout))

        with torch.no_grad():
            t = sample_time(n, cfg.time_dist, generator, dev)
            u = rand(n, generator, dev)
            r = t.clone()
            r = torch.where(near, t - u * min(cfg.near_diag_ratio, cfg.any_step_ratio) * t, r)
            r = torch.where(anyb, t - u * cfg.any_step_ratio * t, r)
            t = torch.where(one, torch.ones_like(t), t)
            r = torch.where(one, torch.zeros_like(r), r)

            data = x.float().clone()
            if fake.any():
                data[fake] = self._one_step_fakes(raw, select_rows(cond, fake), x[fake], generator)
                add_stat(stats, "fake_norm", row_rms(data[fake]).sum(), int(fake.sum()))
            z = randn_like(data, generator)
            x_t = interpolate(data, z, t)
            target = velocity(data, z)
            t_in = torch.where(fake, -t, t)
            r_in = torch.where(fake, -t, r)

        rv = real.nonzero().squeeze(1) if cfg.real_velocity_weight > 0 else None
        if rv is not None and len(rv):
            # The real-velocity rows (x_t, t, t) ride along in the one pass with gradient.
            f_all = model(torch.cat([x_t, x_t[rv]]).to(x.dtype), torch.cat([t_in, t[rv]]),
                          torch.cat([r_in, t[rv]]), cat_rows(cond, select_rows(cond, rv))).float()
            f, f_rv = f_all[:n], f_all[n:]
        else:
            f, f_rv = model(x_t.to(x.dtype), t_in, r_in, cond).float(), None

        with torch.no_grad():
            fd = f.detach()
            lo, hi = cfg.enhance_range
            enhanced = real & (t > lo) & (t < hi)
            if cfg.enhance_ratio > 0 and enhanced.any():
                if uncond is None:
                    raise ValueError("twinflow.enhance_ratio > 0 needs an unconditional condition (uncond); "
                                     "pass one or set enhance_ratio: 0")
                idx = enhanced.nonzero().squeeze(1)
                tt = t[idx]
                vc = teacher.velocity(x_t[idx], tt, tt, select_rows(cond, idx)).float()
                vu = teacher.velocity(x_t[idx], tt, tt, select_rows(uncond, idx)).float()
                target[idx] = target[idx] + cfg.enhance_ratio * (vc - vu)

            v_rv = target[rv].clone() if f_rv is not None else None  # v after enhancement, before RCGM

            based = (near | anyb | (one if cfg.one_step_rcgm else torch.zeros_like(one)))
            if based.any():
                idx = based.nonzero().squeeze(1)
                roll = raw if teacher.rollout_uses_online else teacher.velocity
                clip_rows = torch.zeros_like(based)
                for b in Block:
                    if cfg.block_loss.of(b).clip:
                        clip_rows |= block_ids == b
                target[idx] = rcgm_target(fd[idx], x_t[idx], t[idx], r[idx], target[idx], _no_grad(roll),
                                          select_rows(cond, idx), cfg.rcgm_delta, cfg.rcgm_order, cfg.rcgm_clip,
                                          clip_rows[idx])

        per_row = self._per_row_loss(f, target, block_ids)
        weight = torch.where(fake, torch.ones_like(t), time_weight(t_in, r_in, cfg.time_weight))
        weight = weight * (based | fake).float()
        loss = (weight * per_row).sum() / norm.rows
        for b in Block:
            mask = block_ids == b
            if mask.any() and (b != Block.ONE_STEP or cfg.one_step_rcgm):
                add_stat(stats, f"loss/{BLOCK_NAMES[b]}", per_row.detach()[mask].sum(), int(mask.sum()))

        if f_rv is not None:
            rv_loss = sample_loss(cfg.real_velocity_loss, f_rv, v_rv, cfg.barron_alpha, cfg.barron_c)
            loss = loss + cfg.real_velocity_weight * rv_loss.sum() / norm.rows
            add_stat(stats, "loss/real_velocity", rv_loss.detach().sum(), len(rv))

        if cfg.rectify_coef > 0 and one.any():
            with torch.no_grad():
                x_fake, _ = endpoints(x_t[one], t_in[one], fd[one])
                dv = rectify_delta(_no_grad(raw), x_fake, select_rows(cond, one), cfg.rectify_clip, generator)
            f_one = f[one]
            rect = sample_loss(self._kind(Block.ONE_STEP), f_one, rectify_target(f_one, dv), cfg.barron_alpha,
                               cfg.barron_c)
            loss = loss + cfg.rectify_coef * rect.sum() / max(norm.one_step_rows, 1e-12)
            add_stat(stats, "loss/rectify", rect.detach().sum(), int(one.sum()))
            add_stat(stats, "dv_norm", row_rms(dv).sum(), int(one.sum()))

        add_stat(stats, "loss/total", loss.detach())  # mean over micro-batches = global-batch loss
        return ObjectiveOutput(loss=loss, stats=stats)

    def _kind(self, block: Block) -> str:
        return self.cfg.block_loss.of(block).loss or self.cfg.loss

    def _per_row_loss(self, f: torch.Tensor, target: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """ℓ(F, T) per row, each block with its own loss kind (BlockLoss.loss)."""
        cfg = self.cfg
        kinds = {b: self._kind(b) for b in Block}
        if len(set(kinds.values())) == 1:
            return sample_loss(kinds[Block.ONE_STEP], f, target, cfg.barron_alpha, cfg.barron_c)
        # Both kinds over every row (cheap beside the network), each row taking its block's.
        losses = {k: sample_loss(k, f, target, cfg.barron_alpha, cfg.barron_c) for k in set(kinds.values())}
        per_row = losses[kinds[Block.ONE_STEP]]
        for b, k in kinds.items():
            per_row = torch.where(block_ids == b, losses[k], per_row)
        return per_row

    @torch.no_grad()
    def _one_step_fakes(self, net: VelocityFn, cond: Any, like: torch.Tensor,
                        generator: torch.Generator | None) -> torch.Tensor:
        """x_fake = z' − F(z', 1, 0): detached one-step samples from fresh noise (docs/METHOD.md §5, §9)."""
        zf = randn_like(like.float(), generator)
        ones = torch.ones(zf.shape[0], device=zf.device)
        return zf - net(zf.to(like.dtype), ones, torch.zeros_like(ones), cond).float()


def _no_grad(fn: VelocityFn) -> VelocityFn:
    def call(x, t, r, cond):
        with torch.no_grad():
            return fn(x, t, r, cond)
    return call


def row_rms(x: torch.Tensor) -> torch.Tensor:
    return x.float().flatten(1).pow(2).mean(1).sqrt()


def add_stat(stats: dict, name: str, total: torch.Tensor, count: int = 1) -> None:
    stats[name] = (total.detach().float(), torch.tensor(float(count)))
