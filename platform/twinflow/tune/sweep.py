"""The sweep's driver: config -> Ray Tune ``Tuner`` (ASHA, one TorchTrainer per trial) -> results.

    outcome = run_sweep(cfg)        # blocks until every trial ended; restores an interrupted sweep
    outcome.rows, outcome.winner, outcome.files

Resumable: the experiment lives at <storage_path>/<name>. When it already holds Tune's experiment
state, the driver restores it with ``Tuner.restore(path, trainable=..., resume_unfinished=True,
resume_errored=True)`` instead of starting over: finished trials keep their results and are not run
again, unfinished and errored ones run again (qwen trials' Train runs resume from their checkpoints;
digits trials are short and start over, see trials.py). The first submission records the resolved config as sweep.yaml beside Tune's state; a
re-run whose search, scheduler or target differs is refused (it would mix two sweeps in one table).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from twinflow.config.tree import to_dict
from twinflow.train.prepare import check_same_config, resolved_model_section
from twinflow.train.storage import RunStorage
from twinflow.tune.config import SweepConfig
from twinflow.tune.resources import TRIAL_DRIVER, cluster_capacity, max_concurrent, per_trial_need
from twinflow.tune.search import parse_spec

SWEEP_FILE = "sweep.yaml"
MAY_CHANGE = ("results_dir", "promote", "tune.max_concurrent_trials", "tune.capacity")
"""Fields a re-run may change; everything else must match the recorded sweep."""


@dataclass
class SweepOutcome:
    rows: list[dict[str, Any]]
    winner: dict[str, Any] | None
    files: dict[str, str] = field(default_factory=dict)
    restored: bool = False
    max_concurrent_trials: int = 0
    seconds: float = 0.0


def absolute(cfg: SweepConfig) -> SweepConfig:
    """Local storage as an absolute path: Tune runs each trial in its own working directory."""
    if "://" in cfg.storage_path:
        return cfg
    return dataclasses.replace(cfg, storage_path=os.path.abspath(os.path.expanduser(cfg.storage_path)))


def trial_need(cfg: SweepConfig) -> dict[str, float]:
    """What one trial's workers hold (tune/resources.py explains the formula)."""
    if cfg.target == "digits":
        d = cfg.digits
        return per_trial_need(d.workers, d.resources_per_worker, use_gpu=False)
    s = cfg.qwen.scaling
    # CPU trials: one Ray Data decode task per trial must still get a CPU next to the workers.
    reserve = 0.0 if s.use_gpu else cfg.qwen.data.decode_num_cpus
    return per_trial_need(s.num_workers, s.resources_per_worker, s.use_gpu, reserve_cpus=reserve)


def concurrency(cfg: SweepConfig) -> int:
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    return max_concurrent(trial_need(cfg), cfg.tune.capacity or cluster_capacity())


def param_space(cfg: SweepConfig) -> dict[str, Any]:
    return {path: parse_spec(text, f"search {path}").domain() for path, text in cfg.search_paths().items()}


def check_rerun(storage: RunStorage, cfg: SweepConfig) -> bool:
    """Record sweep.yaml on the first run; on a re-run refuse a different sweep. True: it existed."""
    return check_same_config(storage, SWEEP_FILE, cfg, may_change=MAY_CHANGE, normalise=_resolved_qwen_model,
                             refusal="name: {uri} holds a sweep whose {diff}; re-run with the same settings to "
                                     "resume it, or choose a new name")


def _resolved_qwen_model(config: dict) -> dict:
    """The sweep's training config (``qwen``) with its model defaults resolved (train/prepare.py)."""
    out = dict(config)
    if isinstance(out.get("qwen"), dict):
        out["qwen"] = resolved_model_section(out["qwen"])
    return out


def experiment_trials(path: str, filesystem=None) -> list[dict[str, str]]:
    """[{trial_id, status}] from the latest Tune experiment state under ``path`` ([] when none)."""
    from ray.tune import ExperimentAnalysis, Tuner

    if not Tuner.can_restore(path, storage_filesystem=filesystem):
        return []
    analysis = ExperimentAnalysis(path, storage_filesystem=filesystem)
    return [{"trial_id": t.trial_id, "status": t.status} for t in analysis.trials]


def build_tuner(cfg: SweepConfig, storage: RunStorage, max_concurrent_trials: int, log=print):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from twinflow.tune.trials import run_trial

    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=to_dict(cfg)), dict(TRIAL_DRIVER))
    exp_path = storage.uri()
    fs = storage.fs if storage.remote else None
    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        trials = experiment_trials(exp_path, fs)
        counts: dict[str, int] = {}
        for t in trials:
            counts[t["status"]] = counts.get(t["status"], 0) + 1
        log(f"[tune] restoring the sweep at {exp_path}: {counts or 'no trials yet'}; finished trials are kept, "
            f"the others run again")
        return tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=fs), True
    if cfg.asha.enabled:
        # time_attr "step": rungs in optimizer steps, whatever the report interval, and a trial that
        # resumes from a checkpoint keeps its place. stop_last_trials=False: a trial that survives
        # every rung ends on its own (writing its final checkpoint) instead of being cut at max_t.
        scheduler = ASHAScheduler(time_attr="step", max_t=cfg.max_t, grace_period=cfg.asha.grace_period,
                                  reduction_factor=cfg.asha.reduction_factor, stop_last_trials=False)
    else:
        scheduler = FIFOScheduler()
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        # The concurrency limit goes to the variant generator itself: Tune ignores
        # TuneConfig.max_concurrent_trials when search_alg is a SearchGenerator (it warns and runs
        # every trial at once), and we need our own generator for the seeded draws.
        tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, scheduler=scheduler,
                                    num_samples=cfg.tune.num_samples,
                                    search_alg=BasicVariantGenerator(random_state=cfg.tune.seed,
                                                                     max_concurrent=max_concurrent_trials),
                                    reuse_actors=False),
        run_config=tune.RunConfig(name=cfg.name, **storage.ray_run_config_kwargs(), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    return tuner, False


def results_dir(cfg: SweepConfig) -> str:
    if cfg.results_dir:
        return cfg.results_dir
    if "://" in cfg.storage_path:
        return os.path.join("runs", "tune-results", cfg.name)
    return os.path.join(cfg.storage_path, cfg.name, "results")


def run_sweep(cfg: SweepConfig, log=print) -> SweepOutcome:
    from twinflow.ray_env import connect
    from twinflow.tune.results import collect_rows, pick_winner, write_results

    t0 = time.time()
    cfg = absolute(cfg)
    storage = RunStorage.for_run(cfg.storage_path, cfg.name)
    check_rerun(storage, cfg)
    if cfg.target == "qwen":  # build the tiny model / digits shards once here, not in every trial
        from twinflow.train.prepare import resolved

        resolved(cfg.qwen)
    connect()
    n = concurrency(cfg)
    log(f"[tune] {cfg.target}: metric {cfg.metric} ({cfg.mode}), ASHA "
        f"{'max_t=%d grace=%d rf=%d' % (cfg.max_t, cfg.asha.grace_period, cfg.asha.reduction_factor) if cfg.asha.enabled else 'off'}, "
        f"up to {n} trial(s) at once (one trial holds {trial_need(cfg)})")
    tuner, restored = build_tuner(cfg, storage, n, log)
    grid = tuner.fit()
    rows = collect_rows(grid, cfg)
    winner = pick_winner(rows, cfg)
    files = write_results(rows, winner, cfg, results_dir(cfg))
    print(f"[tune] results in {results_dir(cfg)}", file=sys.stderr, flush=True)
    return SweepOutcome(rows=rows, winner=winner, files=files, restored=restored, max_concurrent_trials=n,
                        seconds=time.time() - t0)
