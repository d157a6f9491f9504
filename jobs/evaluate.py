"""Score a checkpoint (or every new checkpoint of a training run) on GenEval, DPG-Bench and WISE.

Tiny, on this laptop's CPUs (random-weight tiny models, built once into $TWINFLOW_CACHE; the numbers
are meaningless, the plumbing is the real one; results under runs/tiny-evals/):

    python jobs/evaluate.py --preset tiny

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
Exit code: 0 when every expected item was scored; 3 when coverage is incomplete (a stage could not
run, or items failed: each reason is printed and written to results.md); 2 on config errors and
unusable inputs (a missing or truncated checkpoint file, a missing benchmark file), in one line;
130 on Ctrl-C (re-running the same command resumes: scored items are kept).
"""

from __future__ import annotations

import argparse
import logging
import sys

import _code_path  # noqa: E402,F401 - the submitted checkout first on sys.path (jobs/_code_path.py)

from twinflow.config import ConfigError, dump_yaml  # noqa: E402
from twinflow.config.cli import Shortcut, job_parser, fail, interrupted, resolve_config  # noqa: E402

from evals.config import PRESETS, EvalConfig  # noqa: E402


SHORTCUTS = (
    Shortcut("--checkpoint", ("checkpoint={}", "watch_dir="),
             "diffusers pipeline folder or training checkpoint dir holding one"),
    Shortcut("--watch", ("watch_dir={}", "checkpoint=", "output_dir="),
             "score each new checkpoint written under this path", metavar="RUN_STORAGE_PATH"),
    Shortcut("--benchmarks", "benchmarks=[{}]", "comma list: geneval,dpg,wise"),
    Shortcut("--nfe", "nfe=[{}]", "comma list of sampling steps, e.g. 1,2,4"),
    Shortcut("--limit", "limit={}", "first N prompts of each benchmark (0 = all)", type=int),
)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    return job_parser(__doc__, PRESETS, "default", SHORTCUTS).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cfg: EvalConfig = resolve_config(EvalConfig, args, PRESETS, SHORTCUTS)
    if args.dry_run:
        print(dump_yaml(cfg))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from evals.checkpoints import NeedsConversion
    from evals.prompts import DataError
    from evals.runner import evaluate, watch
    from twinflow.export.sources import ExportError
    from twinflow.files import FileProblem

    try:
        if cfg.watch_dir:
            done = watch(cfg)
            print({k: v for k, v in done.items()})
            return 0
        results = evaluate(cfg)
    except (ConfigError, FileProblem, DataError, NeedsConversion, ExportError, FileNotFoundError) as exc:
        return fail(exc)  # bad paths / files / settings: one line, no trace
    except KeyboardInterrupt:
        return interrupted("the same command (scored items are kept)")
    return report(results)


def report(results: dict) -> int:
    """One line per benchmark and NFE, then every reason for incompleteness; the exit code."""
    complete = True
    for name, res in results.items():
        for nfe, r in res["nfe"].items():
            cov = r["coverage"]
            print(f"{res['label']} | NFE {nfe}: overall {r['overall']} | scored {cov['scored']}/{cov['expected']} "
                  f"(failed {cov['failed']}, skipped {cov['skipped']}, missing {cov['missing']})")
            complete &= cov["complete"]
            for reason, n in sorted(cov.get("reasons", {}).items()):
                print(f"  {name} NFE {nfe}: {n} × {reason}", file=sys.stderr)
        for err in res["stage_errors"]:
            print(f"error: {name}: {err}", file=sys.stderr)
        complete &= not res["stage_errors"]
    return 0 if complete else 3


if __name__ == "__main__":
    sys.exit(main())
