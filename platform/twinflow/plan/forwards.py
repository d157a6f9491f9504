"""How many rows go through the network per objective call, with and without gradient.

Read off ``TwinFlowObjective.__call__`` (method/objective.py), for one micro-batch whose rows are
split into the four blocks (one-step, near-diagonal, any-step, fake):

  call                          grad   rows
  fake generation               no     fake rows (before the grad forward)
  online F                      yes    all B rows
  CFG teacher, cond + uncond    no     2 × real non-one-step rows with lo < t < hi (enhance_ratio > 0)
  RCGM rollout, order N         no     N × based rows with t − r ≥ δ (based: near + any + one-step)
  rectification, −τ and +τ      no     2 × one-step rows (rectify_coef > 0)

Row counts that depend on the sampled times (enhancement range, t − r ≥ δ) are given both as an
upper bound (every row qualifies: what memory must hold) and as an expectation under the config's
time distribution (what the time costs on average), estimated by Monte Carlo with the objective's
own samplers and a fixed seed. "B-equivalents" divide row counts by the micro-batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from twinflow.method.blocks import BatchLayout, Block, allocate_micro_batch
from twinflow.method.config import TwinFlowConfig
from twinflow.method.rows import sample_time


@dataclass(frozen=True)
class ForwardCall:
    name: str
    grad: bool
    rows_max: int
    rows_expected: float
    before_grad: bool = False
    """Runs before the grad forward (nothing saved for backward is alive yet)."""


@dataclass
class ForwardSchedule:
    micro_batch: int
    counts: list[int]
    """Rows per block in this micro-batch: one-step, near-diagonal, any-step, fake."""
    calls: list[ForwardCall] = field(default_factory=list)

    def b_equivalents(self, expected: bool = True) -> dict[str, float]:
        def rows(c: ForwardCall) -> float:
            return c.rows_expected if expected else c.rows_max

        grad = sum(rows(c) for c in self.calls if c.grad) / self.micro_batch
        nograd = sum(rows(c) for c in self.calls if not c.grad) / self.micro_batch
        return {"grad_forwards": grad, "nograd_forwards": nograd}

    def largest_nograd_rows(self, before_grad: bool) -> int:
        rows = [c.rows_max for c in self.calls if not c.grad and c.before_grad == before_grad]
        return max(rows, default=0)

    def to_dict(self) -> dict:
        return {"micro_batch": self.micro_batch, "block_rows": dict(zip(("one_step", "near_diag", "any_step", "fake"),
                                                                        self.counts)),
                "calls": [{"name": c.name, "grad": c.grad, "rows_max": c.rows_max,
                           "rows_expected": round(c.rows_expected, 4)} for c in self.calls],
                "b_equivalents_expected": {k: round(v, 4) for k, v in self.b_equivalents(True).items()},
                "b_equivalents_max": {k: round(v, 4) for k, v in self.b_equivalents(False).items()}}


@functools.lru_cache(maxsize=64)
def _fractions(time_dist: tuple[float, float, float], near_ratio: float, any_ratio: float, delta: float,
               lo: float, hi: float, n: int = 1 << 18) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    t = sample_time(n, tuple(time_dist), g, torch.device("cpu"))
    u = torch.rand(n, generator=g)
    gap_near = u * min(near_ratio, any_ratio) * t
    gap_any = u * any_ratio * t
    return {"enhanced": float(((t > lo) & (t < hi)).float().mean()),
            "far_near": float((gap_near >= delta).float().mean()),
            "far_any": float((gap_any >= delta).float().mean())}


def time_fractions(cfg: TwinFlowConfig) -> dict[str, float]:
    """P(lo < t < hi), P(t − r ≥ δ) for near-diagonal and any-step rows, under ``cfg``'s sampling."""
    lo, hi = cfg.enhance_range
    return _fractions(tuple(float(x) for x in cfg.time_dist), float(cfg.near_diag_ratio), float(cfg.any_step_ratio),
                      float(cfg.rcgm_delta), float(lo), float(hi))


def forward_schedule(cfg: TwinFlowConfig, counts: list[int] | tuple[int, ...]) -> ForwardSchedule:
    """The calls of one objective evaluation on a micro-batch with these block ``counts``."""
    one, near, anyb, fake = (int(c) for c in counts)
    b = one + near + anyb + fake
    fr = time_fractions(cfg)
    teacher = {"self": "online, no grad", "ema": "EMA teacher", "frozen": "frozen teacher"}[cfg.teacher]
    rollout_net = "online, no grad" if cfg.teacher in ("self", "frozen") else teacher
    calls: list[ForwardCall] = []
    if fake:
        calls.append(ForwardCall("fake generation (online, no grad)", False, fake, float(fake), before_grad=True))
    calls.append(ForwardCall("online F (grad)", True, b, float(b)))
    if cfg.enhance_ratio > 0 and near + anyb:
        rows = near + anyb
        for branch in ("cond", "uncond"):
            calls.append(ForwardCall(f"CFG teacher {branch} ({teacher})", False, rows, rows * fr["enhanced"]))
    based_one = one if cfg.one_step_rcgm else 0
    based = based_one + near + anyb
    if based:
        expected = based_one + near * fr["far_near"] + anyb * fr["far_any"]
        if expected > 0:
            for k in range(cfg.rcgm_order):
                calls.append(ForwardCall(f"RCGM rollout {k + 1}/{cfg.rcgm_order} ({rollout_net})", False, based,
                                         expected))
    if cfg.rectify_coef > 0 and one:
        for sign in ("-tau", "+tau"):
            calls.append(ForwardCall(f"rectification {sign} (online, no grad)", False, one, float(one)))
    return ForwardSchedule(micro_batch=b, counts=[one, near, anyb, fake], calls=calls)


def micro_batch_counts(cfg: TwinFlowConfig, micro_batch: int, world_size: int = 1,
                       accum_steps: int = 1) -> list[list[int]]:
    """Distinct block compositions of the micro-batches of one optimizer step (all ranks, all
    accumulation steps), as ``allocate_micro_batch`` deals them. ConfigError when the global
    batch is too small for the mix."""
    layout = BatchLayout(micro_batch, world_size, accum_steps)
    weights = cfg.weights()
    seen: list[list[int]] = []
    # Compositions repeat with period M (the rotation); steps 0..M-1 cover them all, but one
    # step already contains every composition that occurs, so step 0 suffices.
    for rank in range(world_size):
        for acc in range(accum_steps):
            ids = allocate_micro_batch(weights, layout, rank, acc, step=0)
            counts = [int((ids == blk).sum()) for blk in Block]
            if counts not in seen:
                seen.append(counts)
    return seen


def worst_case_schedule(cfg: TwinFlowConfig, micro_batch: int, world_size: int = 1,
                        accum_steps: int = 1) -> ForwardSchedule:
    """The micro-batch composition whose largest no-grad call is largest (memory's worst case)."""
    schedules = [forward_schedule(cfg, c) for c in micro_batch_counts(cfg, micro_batch, world_size, accum_steps)]
    return max(schedules, key=lambda s: (s.largest_nograd_rows(False), s.largest_nograd_rows(True),
                                         s.b_equivalents(True)["nograd_forwards"]))


def reference_counts(cfg: TwinFlowConfig, micro_batch: int) -> ForwardSchedule:
    """Expected schedule per B rows with the block shares themselves (fractional rows allowed):
    the per-step cost in B-equivalents independent of how rows are dealt."""
    w = cfg.weights().as_list()
    total = sum(w)
    shares = [micro_batch * x / total for x in w]
    one, near, anyb, fake = shares
    fr = time_fractions(cfg)
    calls: list[ForwardCall] = []
    if fake:
        calls.append(ForwardCall("fake generation", False, 0, fake, before_grad=True))
    calls.append(ForwardCall("online F (grad)", True, micro_batch, float(micro_batch)))
    if cfg.enhance_ratio > 0:
        calls += [ForwardCall(f"CFG teacher {b}", False, 0, (near + anyb) * fr["enhanced"]) for b in ("cond", "uncond")]
    based_one = one if cfg.one_step_rcgm else 0.0
    expected = based_one + near * fr["far_near"] + anyb * fr["far_any"]
    if expected > 0:
        calls += [ForwardCall(f"RCGM rollout {k + 1}", False, 0, expected) for k in range(cfg.rcgm_order)]
    if cfg.rectify_coef > 0 and one:
        calls += [ForwardCall(f"rectification {s}", False, 0, one) for s in ("-tau", "+tau")]
    return ForwardSchedule(micro_batch=micro_batch, counts=[0, 0, 0, 0], calls=calls)
