"""Train Qwen-Image (or another family: model.family, models/families.py) into a 1–2 step generator with
TwinFlow, on Ray Train + DeepSpeed ZeRO.

Without arguments it runs the CPU demo end to end (``make demo``, ~4 min on 2 cores): TwinFlow
distils the pretrained digits base (``model.path: digits-base``, built into $TWINFLOW_CACHE on first
use, ~6.5 min: jobs/build_base.py) from its latent cache on local Ray, 2 CPU workers with DeepSpeed
ZeRO-2 (gloo) training a LoRA with a LoRA-EMA teacher, checkpoints under ./runs/, and at the end
./runs/digits-twinflow/final/ with samples.png (the base at 100 and 1 NFE beside TwinFlow at 1/2/4),
a ready-to-load TwinFlowQwenImagePipeline folder, and the digits probe's table on stderr::

    python jobs/train_qwen.py
    python jobs/train_qwen.py --preset digits-full                             # full-parameter
    python jobs/train_qwen.py --set run.max_steps=200 --set run.name=quick     # shorter
    python jobs/train_qwen.py --set method=meanflow --set run.name=digits-meanflow   # a rival (or method=scm)
    python jobs/train_qwen.py --set method=dmd2 --set run.name=digits-dmd2           # DMD2 (or vsd): LoRA = one base
    python jobs/train_qwen.py --preset tiny                                    # random tiny model: plumbing
    python jobs/train_qwen.py --preset tiny --set model.path=tiny-sana --set data.resolution=32  # SANA
    python jobs/train_qwen.py --dry-run                                        # config + batch plan

On a cluster (see cluster/README.md; S3 credentials from AWS_* variables, MLflow from
MLFLOW_TRACKING_URI)::

    ray job submit --working-dir . -- python jobs/train_qwen.py --config jobs/configs/qwen_image_lora.yaml
    ray job submit --working-dir . -- python jobs/train_qwen.py --config jobs/configs/qwen_image_full_zero3.yaml \\
        --set run.storage_path=s3://my-bucket/twinflow/runs

Re-submitting the same run.name resumes from its last checkpoint. ``--dry-run`` prints the resolved
config, the rows of every TwinFlow block on each rank and accumulation step, the realised λ, the
per-GPU memory plan (table + fits on H100 / H200, twinflow.plan) and the DeepSpeed config, then
exits; it needs no weights, data or Ray. Config errors and unusable inputs (a data shard over
data.bad_share_limit, a truncated or unsafe file) are one line on stderr (exit code 2); a run stopped
by non-finite losses exits with code 3; Ctrl-C says how to resume (exit code 130). The last stdout
line is the run summary as JSON (step, stop reason, data seen / skipped per reason, final folder).
Ray: a fresh local instance, RAY_ADDRESS when set (``ray job submit`` sets it), or ``--address``.
"""

from __future__ import annotations

import json
import sys

import _code_path  # noqa: E402,F401 - the submitted checkout first on sys.path (jobs/_code_path.py)

from twinflow.config import dump_yaml  # noqa: E402
from twinflow.config.cli import job_parser, exit_config_error, fail, interrupted, resolve_config  # noqa: E402
from twinflow.config.errors import ConfigError  # noqa: E402
from twinflow.train.config import TrainConfig  # noqa: E402
from twinflow.train.presets import PRESETS  # noqa: E402
from twinflow.train.plan import dry_run_report, format_batch_plan  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__, PRESETS, "digits").parse_args(argv)
    cfg = resolve_config(TrainConfig, args, PRESETS)

    if args.dry_run:
        report = dry_run_report(cfg)
        print(dump_yaml(cfg))
        print(format_batch_plan(report["batch_plan"]))
        print(report["memory_table"])
        print(json.dumps({"deepspeed_config": report["deepspeed_config"], "memory_plan": report["memory_plan"]},
                         indent=2))
        return 0

    from twinflow.files import FileProblem
    from twinflow.train.trainer import NonFiniteLossError, RunInputError, run_training

    try:
        outcome = run_training(cfg)
    except ConfigError as exc:
        exit_config_error(exc)
    except (RunInputError, FileProblem) as exc:
        return fail(exc)
    except NonFiniteLossError as exc:
        return fail(exc, 3)
    except KeyboardInterrupt:
        return interrupted(f"the same command (run {cfg.run.name} in {cfg.run.storage_path})")
    if outcome.summary.get("digits"):
        print(digits_table(outcome.summary["digits"]), file=sys.stderr)
    print(json.dumps({"run": outcome.run_uri, "seconds": round(outcome.seconds, 1), **outcome.summary}, default=str))
    return 0


def digits_table(scores: dict) -> str:
    """The digits probe as a short table: the starting model (base) against the trained one."""
    rows = [("base", n, q) for n, q in scores["base"].items()] + [("trained", n, q) for n, q in scores["trained"].items()]
    fmt = lambda v: "   –  " if v is None else f"{v:6.3f}"  # noqa: E731
    lines = [f"digits probe (step {scores['step']}; 16 images per prompt)",
             "model     NFE  accuracy  frechet  recall  diversity/real"]
    for who, n, q in rows:
        lines.append(f"{who:8s} {int(n):4d}   {fmt(q['accuracy'])}   {fmt(q['frechet'])}  {fmt(q['recall'])}  "
                     f"{fmt(q['diversity_ratio'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
