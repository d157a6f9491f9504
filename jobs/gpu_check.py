"""GPU check: real-size Qwen-Image (20B) LoRA TwinFlow training steps on one GPU, measured vs planned.

Builds the real Qwen-Image transformer architecture with random weights in bf16 directly on the GPU
(under ``torch.device("cuda")``: no 40 GB detour through host RAM), with TwinFlow's target-time
embedder E2, LoRA r64 on the reference's 14 targets (fp32 adapters) and gradient checkpointing; then
runs LoRA TwinFlow steps at 512² (latents 16×64×64, random prompt embeddings of 64 tokens × 3584,
a random uncond embedding: no text encoder or VAE needed) with the real objective (``twinflow()``:
λ = 1/3, self teacher, CFG enhancement 0.8), and plain flow-matching steps (``fm()``) on the same
batch for the ratios. It reports torch.cuda.max_memory_allocated/reserved and step times, next to
the memory planner's prediction for the same setting. The planner's output comes first (cheap);
every stage is written to the JSON file as soon as it is known, so a timeout still leaves results;
an out-of-memory error is caught and reported. The last line printed is one JSON object.

On the lent GPU machine (installs the carried wheels, 240 s limit, JSON to $OUT)::

    bash jobs/gpu_check.sh run

On a CPU (or with --dry-run): builds the model on the meta device, checks the parameter counts
and prints the plan; nothing heavy runs::

    python jobs/gpu_check.py --dry-run

On a cluster GPU node: ``ray job submit --working-dir . --entrypoint-num-gpus 1 -- python jobs/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import _code_path  # noqa: E402,F401 - the submitted checkout first on sys.path (jobs/_code_path.py)

T0 = time.perf_counter()
REPORT: dict = {}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="meta build + plan only (automatic without CUDA)")
    p.add_argument("--micro-batch", type=int, default=6, help="rows per step (6: every λ = 1/3 block gets a row)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--steps", type=int, default=2, help="timed TwinFlow steps (after one warm-up)")
    p.add_argument("--fm-steps", type=int, default=2, help="timed flow-matching steps (after one warm-up); 0: skip")
    p.add_argument("--budget-s", type=float, default=200.0,
                   help="stop starting new steps when one more would end past this many seconds of run time")
    p.add_argument("--out", default=None, help="JSON file (default: $OUT/gpu_check.json when OUT is set)")
    p.add_argument("--smoke-cpu", action="store_true",
                   help="run the whole GPU path on the CPU with the tiny architecture (a test of this script)")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def save(path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(REPORT, indent=1))


def plan_inputs(args: argparse.Namespace, gpu_bytes: int | None):
    """The check's setting as PlanInputs (the real 20B architecture; tiny with --smoke-cpu)."""
    from twinflow.method.config import twinflow
    from twinflow.models.config import ModelConfig
    from twinflow.models.lora import LoraSettings
    from twinflow.plan import GIB, PlanInputs

    gpu = {"gpu": "custom", "gpu_memory_gib": gpu_bytes / GIB} if gpu_bytes else {"gpu": "h100"}
    if args.smoke_cpu:
        from twinflow.plan.presets import tiny

        return dataclasses.replace(tiny(), micro_batch=args.micro_batch)
    return PlanInputs(model=ModelConfig(path="Qwen/Qwen-Image", mode="lora", lora=LoraSettings(rank=args.rank),
                                                 dtype="bfloat16", gradient_checkpointing=True),
                      twinflow=twinflow(), num_gpus=1, zero_stage=0, micro_batch=args.micro_batch,
                      height=args.resolution, width=args.resolution, text_tokens=args.text_tokens, **gpu)


def meta_check(inputs) -> dict:
    """Build the 20B transformer + LoRA on meta and compare PEFT's count with the planner's."""
    from accelerate import init_empty_weights

    from twinflow.models.lora import add_lora
    from twinflow.plan.params import count_parameters, meta_transformer

    model = meta_transformer(_arch())
    with init_empty_weights():
        add_lora(model, inputs.model.lora)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts = count_parameters(_arch(), inputs.model.lora.rank, tuple(inputs.model.lora_targets()))
    return {"peft_lora_params": lora, "planner_lora_params": counts.lora, "trained_params": trained,
            "base_params": counts.total, "e2_params": counts.e2, "counts_agree": lora == counts.lora
            and trained == counts.lora + counts.e2}


def _arch() -> dict:
    from twinflow.models.qwen_image import QWEN_IMAGE_20B_CONFIG

    return dict(QWEN_IMAGE_20B_CONFIG)


def run_steps(rig, method, n: int, label: str, out: Path | None, budget_s: float = float("inf")) -> dict:
    import torch

    cuda = rig.latents.device.type == "cuda"
    result: dict = {"steps_s": [], "peak_allocated_gib": [], "phases_gib": []}
    for i in range(n + 1):
        last = result["steps_s"][-1] if result["steps_s"] else result.get("warmup_s", 0.0)
        if i > 0 and time.perf_counter() - T0 + 1.5 * last > budget_s:
            log(f"{label}: stopping after {i - 1} timed step(s) to stay inside the {budget_s:.0f}s budget")
            result["stopped_for_budget"] = True
            break
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else rig.static_bytes()
        step = rig.step(method, measure=True)
        peak = base + int(step.peak_bytes or 0)
        reserved = torch.cuda.max_memory_reserved() if cuda else 0
        tag = "warm-up" if i == 0 else f"{i}/{n}"
        log(f"{label} step {tag}: {step.seconds:.2f}s, peak allocated {peak / 2**30:.3f} GiB, "
            f"reserved {reserved / 2**30:.2f} GiB, loss {step.loss:.4f}")
        if i == 0:
            result["warmup_s"] = round(step.seconds, 3)
            result["forwards"] = step.forwards
        else:
            result["steps_s"].append(round(step.seconds, 3))
        result["peak_allocated_gib"].append(round(peak / 2**30, 3))
        result["phases_gib"].append({k: round((base + v[0]) / 2**30, 3) for k, v in step.phases.items()})
        result["max_reserved_gib"] = round(reserved / 2**30, 3)
        REPORT[label] = result
        save(out)
    if result["steps_s"]:
        result["step_s_median"] = statistics.median(result["steps_s"])
    result["peak_allocated_gib_max"] = max(result["peak_allocated_gib"], default=None)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    import torch

    from twinflow.method.config import fm
    from twinflow.plan import GIB, plan_memory

    cuda = torch.cuda.is_available() and not args.dry_run and not args.smoke_cpu
    device = "cuda" if cuda else "cpu"
    REPORT["env"] = {"torch": torch.__version__, "cuda": cuda, "python": sys.version.split()[0]}
    gpu_bytes = None
    if cuda:
        props = torch.cuda.get_device_properties(0)
        gpu_bytes = int(props.total_memory)
        REPORT["env"].update({"device": props.name, "total_gib": round(gpu_bytes / GIB, 2)})
        import diffusers
        import peft

        REPORT["env"].update({"diffusers": diffusers.__version__, "peft": peft.__version__})
    log(f"env: {REPORT['env']}")

    # 1. The plan (cheap, first).
    inputs = plan_inputs(args, gpu_bytes)
    plan = plan_memory(inputs)
    plan_fm = plan_memory(dataclasses.replace(inputs, twinflow=fm()))
    print(plan.table(), flush=True)
    REPORT["plan"] = {"twinflow": plan.to_dict(), "fm_allocated_peak_gib": round(plan_fm.allocated_peak / GIB, 3),
                      "planned_memory_ratio": round(plan.allocated_peak / plan_fm.allocated_peak, 4)}
    save(out)
    if not cuda and not args.smoke_cpu:
        log("no CUDA (or --dry-run): meta-device check only")
        REPORT["meta_check"] = meta_check(inputs)
        REPORT["status"] = "dry-run"
        save(out)
        print(json.dumps(REPORT), flush=True)
        return 0

    # 2. The real-size model on the GPU.
    from twinflow.plan.calibrate import build_rig

    try:
        t = time.perf_counter()
        rig = build_rig(inputs, device, init_context=torch.device(device))
        if cuda:
            torch.cuda.synchronize()
        REPORT["build"] = {"seconds": round(time.perf_counter() - t, 2),
                           "allocated_gib": round((torch.cuda.memory_allocated() if cuda else rig.static_bytes())
                                                  / GIB, 3),
                           "params": sum(p.numel() for p in rig.transformer.parameters()),
                           "trained_params": sum(p.numel() for p in rig.transformer.parameters() if p.requires_grad)}
        log(f"built: {REPORT['build']}")
        save(out)
        REPORT["twinflow"] = run_steps(rig, inputs.twinflow, args.steps, "twinflow", out, args.budget_s)
        if args.fm_steps:
            REPORT["fm"] = run_steps(rig, fm(), args.fm_steps, "fm", out, args.budget_s)
        REPORT["status"] = "ok"
    except torch.cuda.OutOfMemoryError as exc:
        REPORT["status"] = "oom"
        REPORT["error"] = str(exc).splitlines()[0][:500]
        log(f"OUT OF MEMORY: {REPORT['error']}")
    except Exception as exc:  # report, don't lose the partial results
        REPORT["status"] = "error"
        REPORT["error"] = f"{type(exc).__name__}: {exc}"[:1000]
        REPORT["traceback"] = traceback.format_exc()[-3000:]
        log(REPORT["traceback"])

    # 3. Measured vs planned.
    if cuda:
        free, total = torch.cuda.mem_get_info()
        REPORT["non_torch_gib"] = round((total - free - torch.cuda.memory_reserved()) / GIB, 3)
    tf = REPORT.get("twinflow", {})
    if tf.get("peak_allocated_gib"):
        tf["peak_allocated_gib_max"] = max(tf["peak_allocated_gib"])  # also after an OOM mid-way
        measured = tf["peak_allocated_gib_max"] * GIB
        summary = {"measured_peak_allocated_gib": tf["peak_allocated_gib_max"],
                   "planned_allocated_peak_gib": round(plan.allocated_peak / GIB, 3),
                   "planned_over_measured": round(plan.allocated_peak / measured, 4),
                   "measured_max_reserved_gib": tf.get("max_reserved_gib"),
                   "planned_gpu_total_gib": round(plan.gpu_total / GIB, 3),
                   "twinflow_step_s": tf.get("step_s_median")}
        fmr = REPORT.get("fm", {})
        if fmr.get("peak_allocated_gib") and fmr.get("step_s_median") and tf.get("step_s_median"):
            summary["memory_ratio"] = round(tf["peak_allocated_gib_max"] / max(fmr["peak_allocated_gib"]), 4)
            summary["time_ratio"] = round(tf["step_s_median"] / fmr["step_s_median"], 4)
            summary["fm_step_s"] = fmr["step_s_median"]
        REPORT["summary"] = summary
    REPORT["wall_s"] = round(time.perf_counter() - T0, 1)
    save(out)
    print(json.dumps(REPORT), flush=True)
    return 0 if REPORT["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
