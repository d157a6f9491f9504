"""One trial: the trial's sampled values -> the target's config -> a TorchTrainer, fitted in the trial.

Ray Train V2 has no ``Tuner(TorchTrainer)``: the trainable is a plain Tune function (``run_trial``)
that builds a TorchTrainer from its config and calls ``fit()``; the trainer's RunConfig carries
``ray.tune.integration.ray_train.TuneReportCallback``, which forwards every ``ray.train.report`` of
rank 0 to the trial (ray/tune/integration/ray_train.py in Ray 2.60: the Train controller puts the
metrics on a queue the Tune session drains). When ASHA stops a trial, Tune ends the trial's actor;
the Train controller and its workers are that actor's children and end with it.

  digits  the study's worker loop (study/ray_job.py ``worker_loop``) with one run and a
          ``DigitsProbe`` on rank 0; every log step reports loss + 1-NFE quality
  qwen    the training job (train/trainer.py ``run_training``) with the trial's TrainConfig; it
          reports at checkpoints and every logging.ray_report_every steps, with probe.kind metrics

Every trial's Train run lives at <storage_path>/<name>/train_runs/<trial id>: a trial that Tune
restarts after the sweep's driver died re-runs ``fit()`` on the same run, and Ray Train resumes it
from its latest checkpoint (the qwen target checkpoints; a digits run is short and starts over).
"""

from __future__ import annotations

from typing import Any

from twinflow.config.tree import from_dict
from twinflow.data.fs import join
from twinflow.train.config import TrainConfig
from twinflow.train.storage import RunStorage
from twinflow.tune.config import SweepConfig, trial_target

TRAIN_RUNS = "train_runs"
def run_trial(config: dict[str, Any], sweep: dict) -> None:
    """The Tune function trainable (wrapped with tune.with_parameters(sweep=...) in sweep.py)."""
    import ray.tune

    cfg = from_dict(SweepConfig, sweep)
    context = ray.tune.get_context()
    trial_id = context.get_trial_id()
    target = trial_target(cfg, dict(config))  # Tune's config: {dotted path: value}
    if cfg.target == "digits":
        fit_digits_trial(cfg, target, trial_id)
    else:
        fit_qwen_trial(cfg, target, trial_id)


def train_runs_path(cfg) -> str:
    """Where the trials' Train runs live: <storage_path>/<name>/train_runs (local path or URI)."""
    return join(cfg.storage_path, cfg.name, TRAIN_RUNS)


def fit_digits_trial(cfg, target, trial_id: str) -> None:
    from ray.train import CheckpointConfig, RunConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    from twinflow.study.ray_job import study_trainer

    runs = RunStorage.for_run(train_runs_path(cfg), trial_id)
    run = {"dataset": "digits", "method_name": "twinflow", "method": target.twinflow, "train": target.train}
    study_trainer([run], target.workers,
                  RunConfig(name=trial_id, **runs.ray_run_config_kwargs(), checkpoint_config=CheckpointConfig(num_to_keep=1),
                            callbacks=[TuneReportCallback()]),
                  resources_per_worker=dict(target.resources_per_worker),
                  threads=max(1, int(target.resources_per_worker.get("CPU", 1))), parallel="data",
                  probe=target.probe).fit()


def fit_qwen_trial(cfg, target: TrainConfig, trial_id: str) -> None:
    import dataclasses

    from ray.tune.integration.ray_train import TuneReportCallback

    from twinflow.train.trainer import run_training

    run = dataclasses.replace(target.run, name=trial_id, storage_path=train_runs_path(cfg))
    run_training(dataclasses.replace(target, run=run), callbacks=[TuneReportCallback()])
