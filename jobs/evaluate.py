"""Score a checkpoint (or every new checkpoint of a training run) on GenEval, DPG-Bench and WISE.

Tiny, on this laptop's CPUs (builds random-weight tiny models under runs/tiny-evals on first use;
the numbers are meaningless, the plumbing is the real one):

    python jobs/evaluate.py --preset tiny --set data_root=/work/shared/benchmarks

A real checkpoint on a GPU pool (eval nodes advertise the custom resource ``twinflow_eval``):

    export OPENAI_API_KEY=...            # WISE legacy judge (gpt-4o-2024-05-13)
    ray job submit --working-dir . -- python jobs/evaluate.py \\
        --checkpoint /mnt/runs/tf-qwen/checkpoint_000010 --benchmarks geneval,dpg,wise --nfe 1,2,4 \\
        --set data_root=/mnt/benchmarks --set dpg.questions_csv=/mnt/benchmarks/dpg_bench/dpg_bench.csv \\
        --set pool.geneval.num_actors=4 --set pool.dpg.num_actors=4 --set pool.generate.num_actors=4

Follow a training run and score each checkpoint as it lands (writes <checkpoint>/eval/...):

    python jobs/evaluate.py --watch /mnt/runs/tf-qwen --benchmarks geneval --nfe 1,2 --limit 100

Outputs per benchmark: eval/<benchmark>/results.json, results.md (rows = NFE, columns = tags or
categories + overall + coverage, with the published reference rows), grid.png, records.jsonl.
Exit code: 0 when every expected item was scored, 3 when coverage is incomplete, 2 on config errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "platform"), str(Path(__file__).resolve().parents[1])]

from twinflow.config import ConfigError, dump_yaml  # noqa: E402
from twinflow.config.cli import add_config_args, resolve_config  # noqa: E402

from evals.config import PRESETS, EvalConfig  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(p, PRESETS, "default")
    p.add_argument("--checkpoint", help="diffusers pipeline folder or training checkpoint dir holding one")
    p.add_argument("--watch", metavar="RUN_STORAGE_PATH", help="score each new checkpoint written under this path")
    p.add_argument("--benchmarks", help="comma list: geneval,dpg,wise")
    p.add_argument("--nfe", help="comma list of sampling steps, e.g. 1,2,4")
    p.add_argument("--limit", type=int, help="first N prompts of each benchmark (0 = all)")
    args = p.parse_args(argv)
    # The shortcuts are --set overrides applied before the user's own --set.
    short = []
    if args.checkpoint:
        short += [f"checkpoint={args.checkpoint}", "watch_dir="]
    if args.watch:
        short += [f"watch_dir={args.watch}", "checkpoint="]
    if args.benchmarks:
        short.append(f"benchmarks=[{args.benchmarks}]")
    if args.nfe:
        short.append(f"nfe=[{args.nfe}]")
    if args.limit is not None:
        short.append(f"limit={args.limit}")
    args.overrides = short + args.overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cfg: EvalConfig = resolve_config(EvalConfig, args, PRESETS)
    if args.dry_run:
        print(dump_yaml(cfg))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from evals.runner import evaluate, watch

    try:
        if cfg.watch_dir:
            done = watch(cfg)
            print({k: v for k, v in done.items()})
            return 0
        results = evaluate(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as exc:  # bad paths/data/settings: one line, no trace
        print(f"error: {exc}", file=sys.stderr)
        return 2
    complete = True
    for name, res in results.items():
        for nfe, r in res["nfe"].items():
            cov = r["coverage"]
            print(f"{res['label']} | NFE {nfe}: overall {r['overall']} | scored {cov['scored']}/{cov['expected']} "
                  f"(failed {cov['failed']}, skipped {cov['skipped']}, missing {cov['missing']})")
            complete &= cov["complete"]
        complete &= not res["stage_errors"]
    return 0 if complete else 3


if __name__ == "__main__":
    sys.exit(main())
