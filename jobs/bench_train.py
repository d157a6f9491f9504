"""Benchmark: a TwinFlow training step (λ = 1/3) against a plain flow-matching step, same model and batch.

One process builds a small random-weight Qwen-Image transformer from a config (TwinFlow's E2 target-time
embedder, LoRA on the reference targets, gradient checkpointing — the production set-up, scaled
down), one micro-batch of random latents and prompt embeddings, and an AdamW optimizer. Then, in the
same run and on the same batch, it alternates steps of the method presets ``twinflow()`` and ``fm()``
(twinflow/method/config.py) and reports medians over the repetitions:

  time     wall-clock seconds per optimizer step (forward passes, backward, AdamW)
  memory   peak tensor memory of a step: static tensors (weights, optimizer state, batch) + the step's
           high-water mark above them (CPU: the profiler's allocator events; CUDA: max_memory_allocated)
  forwards rows through the network per step in B-equivalents, with and without gradient, counted
           by wrapping F; also with the CFG enhancement off (enhance_ratio = 0)
and the memory planner's prediction for both. The last line printed is one JSON object with
``memory_ratio`` and ``time_ratio`` (TwinFlow ÷ FM, medians). Targets: memory ≤ 1.10×, time ≤ 2.2×.

    python jobs/bench_train.py                       # CPU, 4 layers × 512 wide, 256², B = 6 (~3 min)
    python jobs/bench_train.py --tiny --reps 2       # the tiny preset, seconds
    python jobs/bench_train.py --methods twinflow,fm,meanflow,scm,dmd2,vsd --mode full   # the rivals, full form
    python jobs/bench_train.py --methods twinflow,fm,meanflow,scm,dmd2,vsd --mode lora   # ... and LoRA form
    python jobs/bench_train.py --device cuda --layers 8 --heads 12 --resolution 512   # on a GPU
    ray job submit --working-dir . --entrypoint-num-gpus 1 -- python jobs/bench_train.py --device cuda

Threads: on a shared CPU use ``--threads 1`` (the default): oversubscribed OpenMP threads make CPU
timings meaningless.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import _code_path  # noqa: E402,F401 - the submitted checkout first on sys.path (jobs/_code_path.py)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="use the plan preset 'tiny' (ignores the size flags)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4, help="attention heads of 128 dims each")
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent side = /8)")
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=6, help=">= 6 gives every λ = 1/3 block a row")
    p.add_argument("--mode", choices=["lora", "full"], default="lora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--no-gc", action="store_true", help="gradient checkpointing off")
    p.add_argument("--reps", type=int, default=5, help="timed steps per method")
    p.add_argument("--mem-reps", type=int, default=2, help="memory-measured steps per method")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="twinflow,fm",
                   help=f"comma-separated, from {','.join(METHOD_NAMES)}; every one is measured on the same rig and "
                        "batch and reported relative to fm (DMD2 / VSD in --mode's form: full = fake + real copies, "
                        "lora = a second adapter on the one base)")
    args = p.parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in names if m not in METHOD_NAMES]
    if bad or "fm" not in names or "twinflow" not in names:
        p.error(f"--methods: need fm and twinflow (the ratios' reference) and names from {', '.join(METHOD_NAMES)}"
                + (f"; unknown: {', '.join(bad)}" if bad else ""))
    args.methods = names
    return args


METHOD_NAMES = ("twinflow", "fm", "rcgm", "meanflow", "scm", "dmd2", "vsd")


def method_configs(names: list[str]) -> dict:
    from twinflow.method.config import fm, rcgm, twinflow
    from twinflow.method.dmd import dmd2, vsd
    from twinflow.method.meanflow import MeanFlowConfig, SCMConfig

    make = {"twinflow": twinflow, "fm": fm, "rcgm": rcgm, "meanflow": MeanFlowConfig, "scm": SCMConfig,
            "dmd2": dmd2, "vsd": vsd}
    return {n: make[n]() for n in names}


def build_inputs(args: argparse.Namespace):
    from twinflow.method.config import twinflow
    from twinflow.models.config import ModelConfig
    from twinflow.models.lora import LoraSettings
    from twinflow.plan import PlanInputs
    from twinflow.plan.presets import tiny

    if args.tiny:
        return tiny()
    arch = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": args.layers,
            "attention_head_dim": 128, "num_attention_heads": args.heads, "joint_attention_dim": 512,
            "guidance_embeds": False, "axes_dims_rope": [16, 56, 56]}
    model = ModelConfig(path="from-config", family="qwen-image", mode=args.mode, lora=LoraSettings(rank=args.rank),
                                 dtype=args.dtype, gradient_checkpointing=not args.no_gc)
    return PlanInputs(model=model, architecture=arch, twinflow=twinflow(), num_gpus=1, zero_stage=0,
                      micro_batch=args.micro_batch, height=args.resolution, width=args.resolution,
                      text_tokens=args.text_tokens)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    from twinflow.method.config import twinflow
    from twinflow.plan import GIB, plan_memory
    from twinflow.plan.calibrate import build_rig
    from twinflow.plan.forwards import reference_counts
    from twinflow.plan.method_rig import MethodSteps

    torch.set_num_threads(args.threads)
    inputs = build_inputs(args)
    methods = method_configs(args.methods)
    no_enh = dataclasses.replace(twinflow(), enhance_ratio=0.0)
    plans = {name: plan_memory(dataclasses.replace(inputs, twinflow=methods[name])) for name in ("twinflow", "fm")}
    t0 = time.perf_counter()
    rig = build_rig(inputs, args.device, seed=args.seed)
    build_s = time.perf_counter() - t0
    b = int(rig.latents.shape[0])
    print(f"model: {plans['fm'].params.total:,} params ({plans['fm'].params.lora:,} LoRA), batch {b}, "
          f"{inputs.image_tokens}+{inputs.text_tokens} tokens, built in {build_s:.1f}s", flush=True)

    steps = MethodSteps(rig, methods, lora=inputs.model.mode == "lora")
    for name in methods:  # warm-up: optimizer state, kernels, allocator caches, DMD's extra networks
        steps.step(name)
    times: dict[str, list[float]] = {k: [] for k in methods}
    forwards: dict[str, list[dict]] = {k: [] for k in methods}
    for rep in range(args.reps):
        order = list(methods) if rep % 2 == 0 else list(reversed(methods))  # alternate to cancel drift
        for name in order:
            r = steps.step(name)
            times[name].append(r.seconds)
            forwards[name].append(r.forwards)
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{k} {times[k][-1]:.3f}s" for k in methods), flush=True)
    no_enh_step = rig.step(no_enh)
    static = rig.static_bytes()
    memory: dict[str, list[int]] = {k: [] for k in methods}
    for _ in range(args.mem_reps):
        for name in methods:
            extra = steps.extra_static_bytes(name)
            memory[name].append(static + extra + int(steps.step(name, measure=True).peak_bytes or 0))

    med_t = {k: statistics.median(v) for k, v in times.items()}
    med_m = {k: statistics.median(v) for k, v in memory.items()}

    def counted(rows: list[dict]) -> dict:
        return {k: round(statistics.mean(r[k] for r in rows), 4) for k in ("grad_forwards", "nograd_forwards")}

    per_b = {"enhancement_on": reference_counts(twinflow(), 1).b_equivalents(True),
             "enhancement_off": reference_counts(no_enh, 1).b_equivalents(True)}
    result = {
        "memory_ratio": round(med_m["twinflow"] / med_m["fm"], 4),
        "time_ratio": round(med_t["twinflow"] / med_t["fm"], 4),
        "targets": {"memory_ratio_max": 1.10, "time_ratio_max": 2.2, "time_ratio_reference": 2.0},
        "met": {"memory": med_m["twinflow"] / med_m["fm"] <= 1.10, "time": med_t["twinflow"] / med_t["fm"] <= 2.2},
        "twinflow": {"step_s_median": round(med_t["twinflow"], 4), "step_s": [round(x, 4) for x in times["twinflow"]],
                     "peak_mib_median": round(med_m["twinflow"] / 2**20, 3),
                     "planned_peak_mib": round(plans["twinflow"].allocated_peak / 2**20, 3),
                     "planned_peak_phase": plans["twinflow"].peak_phase},
        "fm": {"step_s_median": round(med_t["fm"], 4), "step_s": [round(x, 4) for x in times["fm"]],
               "peak_mib_median": round(med_m["fm"] / 2**20, 3),
               "planned_peak_mib": round(plans["fm"].allocated_peak / 2**20, 3),
               "planned_peak_phase": plans["fm"].peak_phase},
        "planned_memory_ratio": round(plans["twinflow"].allocated_peak / plans["fm"].allocated_peak, 4),
        "forward_counts": {
            "unit": "rows through F per step / micro-batch B (B-equivalents); λ = 1/3, self teacher",
            "expected_per_b": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in per_b.items()},
            "measured_this_batch": {"twinflow": counted(forwards["twinflow"]), "fm": counted(forwards["fm"]),
                                    "twinflow_enhancement_off": {k: round(v, 4) for k, v in no_enh_step.forwards.items()
                                                                 if k != "calls"}},
            "rows_per_block_this_batch": dict(zip(("one_step", "near_diag", "any_step", "fake"),
                                                  plans["twinflow"].schedule.counts)),
        },
        "config": {"tiny": args.tiny, "params": plans["fm"].params.total, "lora_params": plans["fm"].params.lora,
                   "layers": inputs.architecture["num_layers"],
                   "dim": inputs.architecture["num_attention_heads"] * inputs.architecture["attention_head_dim"],
                   "image_tokens": inputs.image_tokens, "text_tokens": inputs.text_tokens, "micro_batch": b,
                   "mode": inputs.model.mode, "dtype": inputs.model.dtype,
                   "gradient_checkpointing": inputs.model.gradient_checkpointing, "device": args.device,
                   "threads": args.threads, "reps": args.reps, "mem_reps": args.mem_reps,
                   "memory_method": "static tensors + step high-water mark (" +
                                    ("torch.cuda.max_memory_allocated" if args.device.startswith("cuda")
                                     else "CPU allocator events via torch.profiler") + ")"},
        "planned_gib": {k: round(p.allocated_peak / GIB, 6) for k, p in plans.items()},
    }
    if len(methods) > 2:
        # Every method against plain flow matching, same rig and batch (TwinFlow's row is the ratios above).
        result["methods"] = {k: {"step_s_median": round(med_t[k], 4), "peak_mib_median": round(med_m[k] / 2**20, 3),
                                 "time_ratio_to_fm": round(med_t[k] / med_t["fm"], 3),
                                 "memory_ratio_to_fm": round(med_m[k] / med_m["fm"], 3),
                                 "memory_ratio_to_twinflow": round(med_m[k] / med_m["twinflow"], 3),
                                 "extra_static_mib": round(steps.extra_static_bytes(k) / 2**20, 3)}
                             for k in methods}
        lora = inputs.model.mode == "lora"
        result["config"]["mode_of_dmd"] = ("one base + a 'fake' adapter, real = adapters off" if lora
                                           else "fake-score copy (trained) + real-score copy (frozen)")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
