"""Every training method's per-GPU memory at one size: the paper's "OOM" column, computed.

Memory depends on what a method keeps, not on its loss: TwinFlow, MeanFlow and sCM train one network
and keep no copy (their no-grad passes — TwinFlow's fake / CFG / rollout calls, the rivals'
finite-difference tangent — run after the grad forward, and the plan counts the largest single call,
so they plan alike; ``PlanInputs.method = twinflow``). DMD2 and VSD add a trained fake score (its
gradients and AdamW state) and a frozen real score: in full mode two more model copies, in LoRA mode
one more adapter on the one base (``method = dmd``).
"""

from __future__ import annotations

import dataclasses

from twinflow.plan.inputs import GIB, GPU_MEMORY, PlanInputs
from twinflow.plan.memory import plan_memory

METHOD_MEMORY = {"twinflow": "twinflow", "meanflow": "twinflow", "scm": "twinflow", "dmd2": "dmd", "vsd": "dmd"}
"""Training method -> the memory shape it plans as (module docstring)."""


def compare_methods(by_mode: dict[str, PlanInputs], gpus: tuple[str, ...] = ("h100", "h200")) -> list[dict]:
    """One row per (method, mode): GiB per GPU, the ratio to TwinFlow in the same mode, fits per GPU."""
    rows = []
    for mode, inputs in by_mode.items():
        base = None
        for method, shape in METHOD_MEMORY.items():
            plan = plan_memory(dataclasses.replace(inputs, method=shape))
            base = base or plan.gpu_total
            rows.append({"method": method, "mode": mode, "num_gpus": inputs.num_gpus,
                         "zero_stage": inputs.zero_stage, "resolution": inputs.height,
                         "gpu_total_gib": round(plan.gpu_total / GIB, 2),
                         "ratio_to_twinflow": round(plan.gpu_total / base, 3),
                         **{f"fits_{g}": plan.fits(g) for g in gpus},
                         "params": plan.params.total})
    return rows


def format_rows(rows: list[dict], gpus: tuple[str, ...] = ("h100", "h200")) -> str:
    head = "| method | mode | GPUs × ZeRO | GiB / GPU | × TwinFlow | " + " | ".join(
        f"{g} ({GPU_MEMORY[g] / GIB:.0f} GiB)" for g in gpus) + " |"
    lines = [head, "|" + "---|" * (5 + len(gpus))]
    for r in rows:
        lines.append(f"| {r['method']} | {r['mode']} | {r['num_gpus']} × {r['zero_stage']} | "
                     f"{r['gpu_total_gib']:.1f} | "
                     f"{r['ratio_to_twinflow']:.2f} | " + " | ".join("fits" if r[f"fits_{g}"] else "**OOM**"
                                                                    for g in gpus) + " |")
    return "\n".join(lines)
