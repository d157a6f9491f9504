"""Sweep TwinFlow's λ and the learning rate with Ray Tune (ASHA), one Ray Train run per trial.

Each trial is a Tune function trainable that builds and fits a TorchTrainer for its values and
reports the loss and a cheap 1-NFE quality proxy to Tune (TuneReportCallback); ASHA stops the
worst trials at its rungs. Writes the trial table (trials.md, trials.csv), metric_vs_lambda.png and
the winner as ready-to-run YAML (best_train_qwen.yaml; best_study.yaml for digits) under
<storage_path>/<name>/results (./runs/tune-results/<name> when storage is remote; ``results_dir``
overrides). Re-running the same name restores an interrupted sweep.

    python jobs/tune_lambda.py                                   # digits on CPUs (minutes, 2 cores)
    python jobs/tune_lambda.py --set tune.num_samples=1 --set digits.train.steps=300 \\
        --set asha.grace_period=100 --search lam=grid:0.25,0.3333,0.5     # a smaller digits sweep
    python jobs/tune_lambda.py --preset qwen-tiny                # the qwen target, tiny model, CPU
    python jobs/tune_lambda.py --search twinflow.rectify_coef=choice:0.25,0.5,1.0 --search lr=loguniform:1e-4,1e-2
    python jobs/tune_lambda.py --dry-run                         # resolved config, search space, concurrency

On a GPU cluster (the 20B LoRA proxy; trials' workers request twinflow_train, cluster/README.md):

    ray job submit --working-dir . -- python jobs/tune_lambda.py --config jobs/configs/tune_qwen_lora_proxy.yaml \\
        --set storage_path=s3://my-bucket/twinflow/tune --set qwen.data.source=s3://my-bucket/latents-512

--search FIELD=KIND:ARGS adds a searched field (lam and lr are shorthands; KIND is grid, choice,
uniform, loguniform or randint, see platform/twinflow/tune/search.py). Config errors are one line on
stderr (exit code 2) before Ray starts; exit code 3 when no trial completed.
"""

from __future__ import annotations

import argparse
import json
import sys

import _code_path  # noqa: E402,F401 - the submitted checkout first on sys.path (jobs/_code_path.py)

from twinflow.config.cli import job_parser, exit_config_error, interrupted, resolve_config  # noqa: E402
from twinflow.config.errors import ConfigError  # noqa: E402
from twinflow.config.tree import dump_yaml  # noqa: E402
from twinflow.tune.config import PRESETS, SweepConfig, search_edit  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = job_parser(__doc__, PRESETS, "digits")
    p.add_argument("--search", action="append", default=[], metavar="FIELD=KIND:ARGS",
                   help="search a field, e.g. --search twinflow.rectify_coef=choice:0.25,0.5,1.0 "
                        "(lam / lr: the λ and learning-rate shorthands; repeatable)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = resolve_config(SweepConfig, args, PRESETS, edits=[search_edit(args.search)])
    try:
        if args.dry_run:
            from twinflow.tune.sweep import trial_need
            from twinflow.tune.search import grid_size, parse_spec

            specs = {p: parse_spec(s) for p, s in cfg.search_paths().items()}
            print(dump_yaml(cfg))
            print(json.dumps({"search": {p: str(s) for p, s in specs.items()},
                              "trials": grid_size(specs) * cfg.tune.num_samples,
                              "metric": cfg.metric, "mode": cfg.mode, "max_t": cfg.max_t,
                              "report_every": cfg.report_every, "per_trial_need": trial_need(cfg),
                              "max_concurrent_trials": cfg.tune.max_concurrent_trials or "derived at start"},
                             indent=2))
            return 0
        from twinflow.tune.sweep import run_sweep

        outcome = run_sweep(cfg)
    except ConfigError as exc:
        exit_config_error(exc)
    except KeyboardInterrupt:
        return interrupted("the same command (finished trials are kept; Tuner.restore continues the rest)")
    print(json.dumps({"trials": len(outcome.rows), "restored": outcome.restored,
                      "max_concurrent_trials": outcome.max_concurrent_trials, "seconds": round(outcome.seconds, 1),
                      "winner": outcome.winner, "files": outcome.files}, default=str))
    return 0 if outcome.winner is not None else 3


if __name__ == "__main__":
    sys.exit(main())
