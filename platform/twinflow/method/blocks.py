"""Which rows of a batch carry which loss, over the *global* batch of an optimizer step.

Four blocks (docs/METHOD.md §4):
  ONE_STEP   (t, r) = (1, 0) on real data; carries L_rectify (and the RCGM target at (1, 0))
  NEAR_DIAG  r ∈ [(1 − ρ_m)·t, t]; L_base, flow-matching-like
  ANY_STEP   r ~ U(0, t); L_base, the any-step RCGM target
  FAKE       (−τ, −τ) on detached one-step fakes; carries L_adv

λ (``twinflow.lam``) is the share of the global batch given to L_TwinFlow, split equally
between ONE_STEP and FAKE; the rest goes to L_base, split equally between NEAR_DIAG and
ANY_STEP. λ = 1/3 gives 1/6, 1/3, 1/3, 1/6. Explicit weights override λ (the reference's
1:1:1:1 mix is ``BlockWeights(1, 1, 1, 1)``, i.e. λ = 1/2 under this definition).

A 20B run holds 1–4 samples per GPU, too few to hold every block in one micro-batch, so
rows are dealt over the M = world_size × accumulation_steps micro-batches of one optimizer
step: the G = M·micro_batch labels, sorted by block, are dealt round-robin (label k goes to
micro-batch (k + step) mod M). Every optimizer step therefore sees exactly the block counts
of ``block_counts(weights, G)``, each micro-batch gets every block's share within ±1 row,
and the leftover rows rotate across ranks from step to step. Everything here is a pure
function of (global batch, rank, world size, accumulation index, step): no distributed import.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from twinflow.config.errors import ConfigError, require


class Block(enum.IntEnum):
    ONE_STEP = 0
    NEAR_DIAG = 1
    ANY_STEP = 2
    FAKE = 3


BLOCK_NAMES = {b: b.name.lower() for b in Block}


@dataclass
class BlockWeights:
    """Relative shares of the four blocks; only their ratios matter."""

    one_step: float = 1.0
    near_diag: float = 1.0
    any_step: float = 1.0
    fake: float = 1.0

    def as_list(self) -> list[float]:
        return [self.one_step, self.near_diag, self.any_step, self.fake]

    def validate(self, path: str) -> None:
        for name, w in zip(("one_step", "near_diag", "any_step", "fake"), self.as_list()):
            require(w >= 0, f"{path}.{name}", f"block weights must be >= 0, got {w}")
        require(sum(self.as_list()) > 0, path, "at least one block weight must be positive")


def weights_from_lambda(lam: float) -> BlockWeights:
    """λ -> block shares: λ/2 one-step, λ/2 fake, (1 − λ)/2 near-diagonal, (1 − λ)/2 any-step."""
    if not 0.0 <= lam <= 1.0:
        raise ConfigError(f"twinflow.lam: must be in [0, 1], got {lam}")
    return BlockWeights(one_step=lam / 2, near_diag=(1 - lam) / 2, any_step=(1 - lam) / 2, fake=lam / 2)


def _round_counts(w: list[float], n: int) -> list[int]:
    """Largest-remainder rounding of n·w/Σw, ties to the earlier block."""
    exact = [n * wi / sum(w) for wi in w]
    counts = [int(e + 1e-9) for e in exact]
    order = sorted(range(4), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


SHARE_TOLERANCE = 1e-3
"""A share within this of one row counts as one row (λ = 0.3333 at 6 rows gives 0.9999 one-step rows)."""


def block_counts(weights: BlockWeights, n: int) -> list[int]:
    """Rows per block for a batch of ``n``: largest-remainder rounding, ties to the earlier block.

    Raises ConfigError when ``n`` is below ``min_global_batch``: some block of non-zero weight would
    have a share under one row; the message names the blocks the rounding would leave without a row.
    """
    w = weights.as_list()
    counts = _round_counts(w, n)
    need = min_global_batch(weights)
    if n < need:
        empty = [BLOCK_NAMES[Block(i)] for i in range(4) if w[i] > 0 and counts[i] == 0]
        shares = ", ".join(f"{BLOCK_NAMES[Block(i)]} {n * w[i] / sum(w):.2f}" for i in range(4) if w[i] > 0)
        why = (f"{', '.join(empty)} would get no row" if empty else
               f"shares of {shares} rows round to {'/'.join(map(str, counts))}, not the configured mix")
        raise ConfigError(f"global batch {n} is too small for the block mix ({why}): raise the global batch "
                          f"(micro_batch × workers × grad_accum) to at least {need}, or set that block's weight to 0")
    return counts


def min_global_batch(weights: BlockWeights) -> int:
    """Smallest global batch in which every non-zero block's share is at least one row."""
    w = weights.as_list()
    smallest = min(wi for wi in w if wi > 0) / sum(w)
    return max(1, math.ceil((1 - SHARE_TOLERANCE) / smallest))


def realised_shares(counts: list[int]) -> dict[str, float]:
    """Share of each block and the realised λ (one-step + fake share) for printing in --dry-run."""
    n = sum(counts)
    out = {BLOCK_NAMES[Block(i)]: c / n for i, c in enumerate(counts)}
    out["lam"] = (counts[Block.ONE_STEP] + counts[Block.FAKE]) / n
    return out


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's global batch is cut: G = micro_batch × world_size × accum_steps."""

    micro_batch: int
    world_size: int = 1
    accum_steps: int = 1

    @property
    def micro_batches(self) -> int:
        return self.world_size * self.accum_steps

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.micro_batches

    def micro_index(self, rank: int, accum_index: int) -> int:
        return accum_index * self.world_size + rank


def allocate_micro_batch(weights: BlockWeights, layout: BatchLayout, rank: int = 0,
                         accum_index: int = 0, step: int = 0) -> torch.Tensor:
    """Block id (LongTensor [micro_batch], sorted) of each row of one rank's micro-batch."""
    if not 0 <= rank < layout.world_size:
        raise ValueError(f"rank {rank} outside world size {layout.world_size}")
    if not 0 <= accum_index < layout.accum_steps:
        raise ValueError(f"accum_index {accum_index} outside {layout.accum_steps} accumulation steps")
    counts = block_counts(weights, layout.global_batch)
    labels = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    m = layout.micro_batches
    mine = (torch.arange(layout.global_batch) + step) % m == layout.micro_index(rank, accum_index)
    return labels[mine]


@dataclass(frozen=True)
class LossNorm:
    """Denominators that make per-micro-batch losses add up to the global-batch mean.

    DeepSpeed/DDP average gradients over ranks and accumulation steps, so each micro-batch
    divides its *sums* by the average rows per micro-batch (G/M), and the rectify term by the
    average one-step rows per micro-batch. Summed over the M micro-batches and divided by M,
    this is exactly mean_global(ω·ℓ) + dmc·mean_one_step(ℓ_rectify).
    """

    rows: float
    one_step_rows: float

    @staticmethod
    def local(block_ids: torch.Tensor) -> "LossNorm":
        return LossNorm(rows=float(len(block_ids)), one_step_rows=float((block_ids == Block.ONE_STEP).sum()))

    @staticmethod
    def global_(weights: BlockWeights, layout: BatchLayout) -> "LossNorm":
        counts = block_counts(weights, layout.global_batch)
        m = layout.micro_batches
        return LossNorm(rows=layout.global_batch / m, one_step_rows=counts[Block.ONE_STEP] / m)
