"""What ``--dry-run`` prints after the resolved config: the batch plan, DeepSpeed's config, and
the per-GPU memory plan. Pure functions of the config: no Ray, no weights, no storage.

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
    weights = cfg.block_weights()
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


# The planner's verdict is printed for both lent GPU kinds; the training config names no GPU model.
PLAN_GPUS = ("h100", "h200")
TYPICAL_TEXT_TOKENS = 256
"""Prompt tokens planned per row: the planner's typical Qwen-Image prompt length (batches are padded
to their longest prompt, at most encode.max_sequence_length)."""


def plan_overrides(cfg: TrainConfig) -> dict[str, Any]:
    """What the planner cannot read from the config tree itself (``plan_from_train_config`` reads
    ZeRO stage, offload, micro-batch, accumulation, resolution and workers): the prompt length
    planned, which encoders stay resident, and the tiny models' architecture."""
    from twinflow.named import architecture

    out: dict[str, Any] = {
        "text_tokens": min(TYPICAL_TEXT_TOKENS, cfg.encode.max_sequence_length),
        # Raw data is encoded inside each worker (text encoder + VAE stay loaded); rank 0 also keeps
        # the VAE to decode the sample grids.
        "text_encoder_resident": not cfg.data.is_cached,
        "vae_resident": (not cfg.data.is_cached) or cfg.sample.enabled,
    }
    from twinflow.plan.compare import METHOD_MEMORY

    out["method"] = METHOD_MEMORY[cfg.method]  # DMD2 / VSD plan their fake (and, full, real) score too
    named = architecture(cfg.model.path)
    if named is not None:  # named models (tiny, digits-base) are built on first use: plan from their recipe
        out["architecture"] = named
    return out


def build_memory_plan(cfg: TrainConfig):
    """The planner's ``MemoryPlan`` for this config (twinflow.plan; a meta-device model, no weights)."""
    from twinflow.plan import plan_from_train_config

    return plan_from_train_config(cfg, **plan_overrides(cfg))


def memory_plan(cfg: TrainConfig, plan=None) -> dict[str, Any] | None:
    """Per-GPU memory estimate (weights, gradients, optimizer state, activations) as a dict, with the
    verdict for H100 and H200; ``{"error": ...}`` when the model cannot be planned (e.g. a hub id the
    planner has no architecture for)."""
    from twinflow.config.errors import ConfigError

    try:
        plan = plan or build_memory_plan(cfg)
    except ConfigError as exc:
        return {"error": str(exc)}
    out = plan.to_dict()
    out["fits_gpus"] = {gpu: plan.fits(gpu) for gpu in PLAN_GPUS}
    out["workers_use_gpu"] = cfg.scaling.use_gpu
    return out


def format_memory_plan(cfg: TrainConfig, plan=None) -> str:
    """The planner's table, then one verdict line per GPU kind (or why there is no plan)."""
    from twinflow.config.errors import ConfigError

    try:
        plan = plan or build_memory_plan(cfg)
    except ConfigError as exc:
        return f"memory plan: not available ({exc})"
    lines = ["memory plan (per GPU):", plan.table()]
    for gpu in PLAN_GPUS:
        verdict = "fits" if plan.fits(gpu) else "does NOT fit"
        lines.append(f"{gpu}: {verdict} (headroom {plan.headroom(gpu) / 2**30:.2f} GiB at margin "
                     f"{plan.inputs.margin:.0%})")
    if not cfg.scaling.use_gpu:
        lines.append("note: scaling.use_gpu is false: these workers run on CPU, so the numbers are each worker's "
                     "memory as it would be on a GPU; the GPU verdicts do not apply")
    return "\n".join(lines)


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
    """Everything --dry-run prints: the batch plan, DeepSpeed's config, and the memory plan (as a dict
    and as the human-readable ``memory_table``); the model is planned once."""
    from twinflow.config.errors import ConfigError

    try:
        plan = build_memory_plan(cfg)
    except ConfigError:
        plan = None  # memory_plan / format_memory_plan report why
    return {"batch_plan": batch_plan(cfg), "deepspeed_config": deepspeed_config(cfg),
            "memory_plan": memory_plan(cfg, plan), "memory_table": format_memory_plan(cfg, plan)}
