"""Per-GPU memory plan of a TwinFlow Qwen-Image training configuration — before renting GPUs.

No weights, no GPU and no Ray: the real 20B transformer is built on the meta device and counted.
Prints the breakdown (weights, master weights, optimizer, gradients, buffers, teacher copy,
activations by phase of the step), whether it fits the chosen GPU with the margin, and the
forward passes per step. ``--compare`` adds what-ifs: an EMA teacher, DMD-style distillation's
extra copies, and every training method (TwinFlow, MeanFlow, sCM, DMD2, VSD) in LoRA and full form
with its verdict on H100 (80 GB) and H200 (141 GB): the paper's memory argument, computed.
``--calibrate`` runs a small configuration on this CPU and prints measured vs planned peak memory. The last line printed with ``--json`` is JSON.

    python jobs/plan.py --preset qwen-image-lora-512
    python jobs/plan.py --preset qwen-image-full-zero3-1024 --set num_gpus=16 --set offload_optimizer=true
    python jobs/plan.py --preset qwen-image-full-zero3-1024 --set num_gpus=1 --set zero_stage=0 --set grad_accum=3 --compare
    python jobs/plan.py --compare                                # every method at 20B, 8 × H100 / H200
    python jobs/plan.py --preset tiny --calibrate --json          # tiny CPU check (~1 min)

Fields for --set: model.mode (lora|full), model.lora.rank, model.dtype, model.gradient_checkpointing,
twinflow.teacher (self|ema|frozen), twinflow.enhance_ratio, twinflow.lam, num_gpus, zero_stage,
offload_optimizer, offload_params, micro_batch, grad_accum, height, width, text_tokens,
text_encoder_resident, vae_resident, method (twinflow|dmd), gpu (h100|h200|a100-80g|…|custom),
gpu_memory_gib, margin, buffers.reduce_bucket_size, …

On a cluster it needs nothing from one; ``ray job submit --working-dir . -- python jobs/plan.py
--preset qwen-image-lora-512`` works too (it runs on the head node's CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import _code_path  # noqa: E402,F401 - the submitted checkout first on sys.path (jobs/_code_path.py)

from twinflow.config.cli import job_parser, exit_config_error, resolve_config  # noqa: E402
from twinflow.config.errors import ConfigError  # noqa: E402
from twinflow.config.tree import dump_yaml  # noqa: E402
from twinflow.plan import GIB, PlanInputs, plan_memory  # noqa: E402
from twinflow.plan.compare import compare_methods, format_rows  # noqa: E402
from twinflow.plan.presets import PLAN_PRESETS  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = job_parser(__doc__, PLAN_PRESETS, "qwen-image-lora-512")
    p.add_argument("--compare", action="store_true", help="also plan an EMA teacher and DMD-style copies")
    p.add_argument("--calibrate", action="store_true", help="run the configuration on this CPU (small models "
                                                            "only) and print measured vs planned peak memory")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object (last line)")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> PlanInputs:
    """The front door (preset <- YAML <- --set), validated as a plan: the checkpoint path need not exist."""
    return resolve_config(PlanInputs, args, PLAN_PRESETS, check=_check_plan)


def _check_plan(inputs: PlanInputs) -> None:
    inputs.validate()
    inputs.twinflow.validate("twinflow")


def compare(inputs: PlanInputs) -> list[dict]:
    """The configured run next to what-ifs, on H100 and H200."""
    variants = [("as configured", inputs),
                ("EMA teacher", dataclasses.replace(inputs, twinflow=dataclasses.replace(inputs.twinflow,
                                                                                         teacher="ema"))),
                ("DMD-style (fake score + frozen teacher)", dataclasses.replace(inputs, method="dmd"))]
    base = plan_memory(inputs).gpu_total
    out = []
    for name, variant in variants:
        plan = plan_memory(variant)
        out.append({"variant": name, "gpu_total_gib": round(plan.gpu_total / GIB, 2),
                    "ratio_to_configured": round(plan.gpu_total / base, 3),
                    "fits_h100": plan.fits("h100"), "fits_h200": plan.fits("h200")})
    return out


def method_forms(inputs: PlanInputs) -> dict[str, PlanInputs]:
    """The configuration in LoRA and in full form (full: ZeRO-3, the only stage a 20B full fine-tune fits)."""
    lora = dataclasses.replace(inputs, model=dataclasses.replace(inputs.model, mode="lora"))
    full = dataclasses.replace(inputs, model=dataclasses.replace(inputs.model, mode="full"), zero_stage=3)
    return {"lora": lora, "full": full}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    inputs = resolve(args)
    if args.dry_run:
        print(dump_yaml(inputs))
        return 0
    try:
        plan = plan_memory(inputs)
    except ConfigError as exc:
        exit_config_error(exc)
        raise
    print(plan.table(), flush=True)
    result = plan.to_dict()
    if args.compare:
        rows = compare(inputs)
        print("\nwhat-ifs (GPU total per GPU, GiB):")
        for r in rows:
            print(f"  {r['variant']:42s} {r['gpu_total_gib']:8.2f}  ×{r['ratio_to_configured']:.2f}  "
                  f"H100 {'fits' if r['fits_h100'] else 'no'}  H200 {'fits' if r['fits_h200'] else 'no'}")
        result["compare"] = rows
        methods = compare_methods(method_forms(inputs))
        print(f"\nevery method, {inputs.num_gpus} GPUs, {inputs.height}², micro-batch {inputs.micro_batch} "
              "(plan/compare.py):")
        print(format_rows(methods))
        result["methods"] = methods
    if args.calibrate:
        if plan.params.total > 500_000_000:
            print("--calibrate runs the model on this CPU: only for small configurations (<= 500M params)",
                  file=sys.stderr)
            return 2
        from twinflow.plan.calibrate import measure_against_plan

        cal = measure_against_plan(inputs, plan=plan)
        print(f"\nmeasured on CPU: {cal['measured_bytes'] / 2**20:.2f} MiB (static {cal['measured_static_bytes'] / 2**20:.2f}"
              f" + step peak {cal['measured_step_peak_bytes'] / 2**20:.2f}); planned {cal['planned_bytes'] / 2**20:.2f} MiB;"
              f" planned/measured {cal['planned_over_measured']:.3f}")
        result["calibration"] = cal
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
