"""Small-scale study: flow matching vs RCGM-only vs TwinFlow on real data, through Ray Train.

Trains each method on sklearn's handwritten digits (class-conditional, 8×8) and on a 2-D Gaussian
mixture with Ray Train CPU workers (a local Ray is started if none is running), samples each at
1, 2, 4 and 100 NFE with fixed seeds, and scores them against their real-vs-real floors.
Writes OUT/results.json, OUT/results.md and OUT/samples_<dataset>_<method>.png.

    python jobs/small_scale_study.py --quick                 # ≈2 min on 2 cores (tests, smoke runs)
    python jobs/small_scale_study.py --out runs/study        # the full study (≈20 min on 2 cores)
    python jobs/small_scale_study.py --sweep-lam             # the λ ablation on digits (λ = 0 … 2/3)
    python jobs/small_scale_study.py --datasets mixture2d --steps 3000 --lam 0.25 \
        --set method.twinflow.teacher=ema --set eval.seeds=1
    ray job submit --working-dir . -- python jobs/small_scale_study.py --workers 4

The workers share the study run by run (``parallel: runs``: no per-step all-reduce, the fastest
for these small networks); ``--set parallel=data`` trains every run data-parallel (torch DDP) over all
workers instead, as the Qwen-Image job does. --dry-run prints the resolved config and exits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # run from a checkout

from twinflow.config.cli import add_config_args, exit_config_error, interrupted, use_address  # noqa: E402
from twinflow.config.errors import ConfigError  # noqa: E402
from twinflow.config.tree import build, dump_yaml  # noqa: E402
from twinflow.study.config import DATASETS, PAPER_LAMBDAS, PRESETS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(p, PRESETS, default_preset="full")
    p.add_argument("--quick", action="store_true", help="shorthand for --preset quick")
    p.add_argument("--out", help="output folder (default: runs/study, or runs/study-quick with --quick)")
    p.add_argument("--datasets", help=f"comma-separated subset of {','.join(DATASETS)}")
    p.add_argument("--steps", type=int, help="training steps per run, for every dataset")
    p.add_argument("--lam", type=float, help="TwinFlow λ: share of the global batch for L_TwinFlow (default 1/3)")
    p.add_argument("--workers", type=int, help="Ray Train workers (default 2); each trains whole runs "
                   "(--set parallel=data: every run data-parallel over all of them)")
    p.add_argument("--mixture-modes", type=int, help="modes of the 2-D mixture (default 8)")
    p.add_argument("--mixture-seed", type=int, help="seed choosing the mixture (default 0)")
    p.add_argument("--sweep-lam", nargs="?", const="paper", metavar="L1,L2,...",
                   help="λ ablation instead of the comparison: TwinFlow at each λ (default 0,1/6,1/3,1/2,2/3) "
                        "on digits unless --datasets says otherwise")
    return p.parse_args(argv)


def shorthand_overrides(args: argparse.Namespace) -> list[str]:
    sets = []
    if args.out:
        sets.append(f"out={args.out}")
    if args.datasets:
        sets.append(f"datasets=[{args.datasets}]")
    if args.steps is not None:
        sets += [f"{d}.steps={args.steps}" for d in DATASETS]
    if args.lam is not None:
        sets.append(f"method.twinflow.lam={args.lam}")
    if args.workers is not None:
        sets.append(f"workers={args.workers}")
    if args.mixture_modes is not None:
        sets.append(f"mixture.modes={args.mixture_modes}")
    if args.mixture_seed is not None:
        sets.append(f"mixture.seed={args.mixture_seed}")
    if args.sweep_lam:
        lams = PAPER_LAMBDAS if args.sweep_lam == "paper" else [float(v) for v in args.sweep_lam.split(",")]
        sets += [f"sweep_lam=[{', '.join(repr(v) for v in lams)}]", "eval.nfe=[1]"]
        if not args.datasets:
            sets.append("datasets=[digits]")
        if not args.out:
            sets.append(f"out=runs/study-lam{'-quick' if args.quick else ''}")
    return sets


def main(argv=None) -> None:
    args = parse_args(argv)
    use_address(args)
    preset = "quick" if args.quick else args.preset
    try:
        cfg = build(PRESETS[preset]().__class__, PRESETS[preset](), args.config,
                    shorthand_overrides(args) + args.overrides)
    except ConfigError as exc:
        exit_config_error(exc)
    if args.dry_run:
        print(dump_yaml(cfg))
        return

    from twinflow.study.runner import run_study

    try:
        run_study(cfg)
    except KeyboardInterrupt:
        sys.exit(interrupted("the same command"))
    print(f"results: {Path(cfg.out) / 'results.json'}")


if __name__ == "__main__":
    main()
