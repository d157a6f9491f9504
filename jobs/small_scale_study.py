"""Small-scale study: flow matching vs RCGM-only vs TwinFlow (and the rivals) on real data, through Ray Train.

Trains each method on sklearn's handwritten digits (class-conditional, 8×8) and on a 2-D Gaussian
mixture with Ray Train CPU workers (a fresh local Ray unless RAY_ADDRESS / --address), once per
training seed (--train-seeds, default 3; 1 with --quick), samples each at 1, 2, 4, 8 and 100 NFE with
fixed seeds, and scores them against their real-vs-real floors: every cell is the mean ± std over
training seeds, with ratios to flow matching at 100 NFE (seed by seed, and floor-corrected).
Writes OUT/results.json, OUT/results.md and OUT/samples_<dataset>_<method>.png.

    python jobs/small_scale_study.py --quick                 # ≈2 min on 2 cores (tests, smoke runs)
    python jobs/small_scale_study.py --out runs/study        # the full study (3 training seeds; one seed took ≈20 min)
    python jobs/small_scale_study.py --quick --methods fm,twinflow,meanflow,scm,dmd2,vsd   # with the rivals
    python jobs/small_scale_study.py --sweep-lam             # the λ ablation on digits (λ = 0 … 2/3)
    python jobs/small_scale_study.py --quick --train-seeds 3 --ablation   # the loss ablation (study/ablation.py)
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

import _code_path  # noqa: E402,F401 - the submitted checkout first on sys.path (jobs/_code_path.py)

from twinflow.config.cli import Shortcut, job_parser, interrupted, resolve_config  # noqa: E402
from twinflow.config.tree import dump_yaml  # noqa: E402
from twinflow.study.ablation import ABLATIONS  # noqa: E402
from twinflow.study.config import DATASETS, METHODS, PAPER_LAMBDAS, PRESETS, RIVALS, StudyConfig  # noqa: E402


def _sweep_lam(value: str, args: argparse.Namespace) -> list[str]:
    lams = PAPER_LAMBDAS if value == "paper" else [float(v) for v in value.split(",")]
    sets = [f"sweep_lam=[{', '.join(repr(v) for v in lams)}]", "eval.nfe=[1]"]
    if not args.datasets:
        sets.append("datasets=[digits]")
    if not args.out:
        sets.append(f"out=runs/study-lam{'-quick' if args.quick else ''}")
    return sets


def _ablation(value: str, args: argparse.Namespace) -> list[str]:
    names = list(ABLATIONS) if value == "all" else value.split(",")
    sets = [f"ablation=[{', '.join(names)}]"]
    if not args.methods:
        sets.append("methods=[fm]")  # the reference every ratio is taken against
    if not args.out:
        sets.append(f"out=runs/study-ablation{'-quick' if args.quick else ''}")
    return sets


SHORTCUTS = (
    Shortcut("--out", "out={}", "output folder (default: runs/study, or runs/study-quick with --quick)"),
    Shortcut("--datasets", "datasets=[{}]", f"comma-separated subset of {','.join(DATASETS)}"),
    Shortcut("--methods", "methods=[{}]", f"comma-separated methods (default {','.join(METHODS)}); the paper's "
             f"rivals: {','.join(RIVALS)}"),
    Shortcut("--steps", tuple(f"{d}.steps={{}}" for d in DATASETS), "training steps per run, for every dataset",
             type=int),
    Shortcut("--lam", "method.twinflow.lam={}", "TwinFlow λ: share of the global batch for L_TwinFlow (default 1/3)",
             type=float),
    Shortcut("--workers", "workers={}", "Ray Train workers (default 2); each trains whole runs "
             "(--set parallel=data: every run data-parallel over all of them)", type=int),
    Shortcut("--mixture-modes", "mixture.modes={}", "modes of the 2-D mixture (default 8)", type=int),
    Shortcut("--mixture-seed", "mixture.seed={}", "seed choosing the mixture (default 0)", type=int),
    Shortcut("--train-seeds", "train_seeds={}", "independently trained runs per cell; every table cell is their "
             "mean ± std (default 3, 1 with --quick)", type=int),
    Shortcut("--sweep-lam", _sweep_lam, "λ ablation instead of the comparison: TwinFlow at each λ (default "
             "0,1/6,1/3,1/2,2/3) on digits unless --datasets says otherwise", nargs="?", const="paper",
             metavar="L1,L2,..."),
    Shortcut("--ablation", _ablation, f"the loss ablation: TwinFlow variants beside FM (all: {','.join(ABLATIONS)}; "
             "study/ablation.py), on both datasets unless --datasets says otherwise", nargs="?", const="all",
             metavar="V1,V2,..."),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = job_parser(__doc__, PRESETS, "full", SHORTCUTS)
    p.add_argument("--quick", action="store_true", help="shorthand for --preset quick")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = resolve_config(StudyConfig, args, PRESETS, SHORTCUTS, preset="quick" if args.quick else None)
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
