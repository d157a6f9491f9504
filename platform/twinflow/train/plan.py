"""What ``--dry-run`` prints after the resolved config: the batch plan, DeepSpeed's config, and
(a later issue) the memory plan. Pure functions of the config: no Ray, no weights, no storage.

Batch plan: the G = micro × workers × accumulation rows of one optimizer step are dealt over
the M = workers × accumulation micro-batches (method/blocks.py); for each rank and accumulation
index it lists the rows of every block, and the realised λ (one-step + fake share of G), which
can differ from ``twinflow.lam`` by rounding. Allocation rotates the leftover rows with the step,
so steps 0 and 1 are both shown.
"""

from __future__ import annotations

from typing import Any

from twinflow.method.blocks import BLOCK_NAMES, Block, LossNorm, allocate_micro_batch, block_counts, realised_shares
from twinflow.train.config import TrainConfig
from twinflow.train.ds_config import deepspeed_config


def batch_plan(cfg: TrainConfig, steps: tuple[int, ...] = (0, 1)) -> dict[str, Any]:
    weights = cfg.twinflow.weights()
    layout = cfg.layout
    counts = block_counts(weights, layout.global_batch)
    shares = realised_shares(counts)
    norm = LossNorm.global_(weights, layout)
    per_step = {}
    for step in steps:
        rows = []
        for rank in range(layout.world_size):
            for accum in range(layout.accum_steps):
                ids = allocate_micro_batch(weights, layout, rank, accum, step)
                rows.append({"rank": rank, "accum": accum,
                             **{BLOCK_NAMES[b]: int((ids == b).sum()) for b in Block}})
        per_step[f"step {step}"] = rows
    return {
        "global_batch": layout.global_batch,
        "micro_batch_per_gpu": layout.micro_batch,
        "world_size": layout.world_size,
        "accumulation_steps": layout.accum_steps,
        "block_counts": {BLOCK_NAMES[Block(i)]: c for i, c in enumerate(counts)},
        "lam_requested": None if cfg.twinflow.block_weights is not None else cfg.twinflow.lam,
        "lam_realised": shares["lam"],
        "loss_norm": {"rows": norm.rows, "one_step_rows": norm.one_step_rows},
        "micro_batches": per_step,
    }


def memory_plan(cfg: TrainConfig) -> dict[str, Any] | None:
    """Hook for the per-GPU memory estimate (weights, gradients, optimizer state, activations)
    that --dry-run prints; None until that issue lands."""
    return None


def format_batch_plan(plan: dict[str, Any]) -> str:
    names = [BLOCK_NAMES[b] for b in Block]
    lines = [f"global batch {plan['global_batch']} = {plan['micro_batch_per_gpu']} per GPU × {plan['world_size']} "
             f"workers × {plan['accumulation_steps']} accumulation steps",
             "blocks per optimizer step: " + ", ".join(f"{k} {v}" for k, v in plan["block_counts"].items()),
             f"λ realised {plan['lam_realised']:.4f}" + (f" (requested {plan['lam_requested']:.4f})"
                                                         if plan["lam_requested"] is not None else
                                                         " (explicit twinflow.block_weights)")]
    for step, rows in plan["micro_batches"].items():
        lines.append(f"{step}: rows per block on each rank and accumulation step")
        lines.append("  rank accum  " + "  ".join(f"{n:>9}" for n in names))
        for r in rows:
            lines.append(f"  {r['rank']:>4} {r['accum']:>5}  " + "  ".join(f"{r[n]:>9}" for n in names))
    return "\n".join(lines)


def dry_run_report(cfg: TrainConfig) -> dict[str, Any]:
    return {"batch_plan": batch_plan(cfg), "deepspeed_config": deepspeed_config(cfg), "memory_plan": memory_plan(cfg)}
