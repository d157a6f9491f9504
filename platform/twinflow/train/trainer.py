"""The driver: config -> Ray Train ``TorchTrainer`` (DeepSpeed inside each worker) -> result.

    outcome = run_training(cfg)          # blocks until the run ends; raises on failure
    outcome.summary["final"]             # <run>/final, see train/export.py

What it sets up, and why:
  ScalingConfig      num_workers × resources_per_worker (GPU presets: {"GPU": 1, "twinflow_train": 1})
  TorchConfig        backend nccl/gloo and the collective timeout ``scaling.timeout_s``: a dead peer
                     fails the step after it (and Ray Train restarts the group) instead of hanging
  RunConfig          storage_path (+ storage_filesystem for S3), name, CheckpointConfig(num_to_keep),
                     FailureConfig(max_failures): a dead worker or node restarts the whole group
                     from the latest registered checkpoint
  datasets           the data layer's Ray Dataset, split equally over ranks (``streaming_split``) with
                     ``preserve_order`` so that every rank sees the same rows in the same order in
                     every epoch and after every restart (exact resume; without it Ray hands blocks to
                     whichever rank asks first)
Re-submitting the same (storage_path, name) resumes: Ray Train V2 finds the run's checkpoints and
the workers restore the latest (train/loop.py); ``check_resubmission`` refuses incompatible changes.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from twinflow.config.errors import ConfigError
from twinflow.config.tree import to_dict
from twinflow.train.config import TrainConfig
from twinflow.files import check_model_folder
from twinflow.train.prepare import check_resubmission, resolved
from twinflow.train.storage import RunStorage


class NonFiniteLossError(RuntimeError):
    """The run stopped because run.nan_limit steps in a row had non-finite losses."""


class RunInputError(RuntimeError):
    """The run stopped on an input a restart cannot fix (bad data, an unreadable or unsafe file): one line."""


@dataclass
class TrainOutcome:
    summary: dict[str, Any]
    """Rank 0's return value: step, stop_reason, skipped_steps, final (URI), last metrics row, ..."""
    result: Any
    """ray.train.Result (latest checkpoint, its metrics, the run path)."""
    run_uri: str
    seconds: float


def mlflow_env(cfg: TrainConfig) -> dict[str, str] | None:
    """The driver's MLFLOW_* variables (tracking URI, credentials, ...) for rank 0, or None when MLflow
    is off: workers on other nodes do not inherit the submitting shell's environment."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if cfg.logging.mlflow == "off":
        return None
    if cfg.logging.mlflow == "on" and not uri:
        raise ConfigError("logging.mlflow: is 'on' but MLFLOW_TRACKING_URI is not set; set it (e.g. "
                          "http://mlflow:5000) or use logging.mlflow: auto")
    if not uri:
        return None
    return {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}


def build_trainer(cfg: TrainConfig, storage: RunStorage, callbacks: list | tuple = ()):
    """The TorchTrainer for ``cfg`` (Ray must be connected: the dataset is created here).
    ``callbacks``: Ray Train UserCallbacks, e.g. Tune's TuneReportCallback in a sweep trial."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from twinflow.data.fs import filesystem_for
    from twinflow.data.ingest import warn_missing_resources
    from twinflow.data.loader import open_training_data
    from twinflow.train.loop import train_loop_per_worker

    tracking_env = mlflow_env(cfg)
    work_cfg, model_path = resolved(cfg)
    data_fs, _ = filesystem_for(work_cfg.data.source)
    enc = cfg.encode
    data = open_training_data(work_cfg.data, cfg.deepspeed.micro_batch_per_gpu, model_path=model_path,
                              filesystem=data_fs, encode_device=enc.device, encode_dtype=enc.dtype,
                              max_sequence_length=enc.max_sequence_length, world_size=cfg.scaling.num_workers)
    custom = {k: v for k, v in cfg.scaling.resources_per_worker.items() if k not in ("CPU", "GPU", "memory")}
    warn_missing_resources(custom, "scaling.resources_per_worker")
    ingest = DataConfig.default_ingest_options()  # Ray Train's defaults, plus a deterministic order
    ingest.preserve_order = True
    counts = ({"ledger": data.ledger} if data.ledger is not None else
              {"static": {"shards": len(data.manifest.shards), "seen": data.manifest.counts.get("seen", 0),
                          "ok": data.manifest.counts.get("rows", 0),
                          "skipped": dict(data.manifest.counts.get("skipped", {}))}})
    payload = {"config": to_dict(work_cfg), "model_path": model_path, "batch_spec": data.spec,
               "storage": storage, "data_filesystem": data_fs, "mlflow_env": tracking_env, "data_counts": counts}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload,
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=dict(cfg.scaling.resources_per_worker)),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo", timeout_s=cfg.scaling.timeout_s),
        run_config=RunConfig(name=cfg.run.name, **storage.ray_run_config_kwargs(),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                             callbacks=list(callbacks)),
        datasets={"train": data.dataset},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest),
    )


def run_training(cfg: TrainConfig, storage_filesystem=None, callbacks: list | tuple = ()) -> TrainOutcome:
    """Run (or resume) the training job described by ``cfg``; raises NonFiniteLossError or Ray's
    TrainingFailedError when it cannot finish. ``storage_filesystem`` overrides the one derived
    from run.storage_path (tests; S3 settings otherwise come from AWS_* variables); ``callbacks`` go to
    the TorchTrainer's RunConfig (jobs/tune_lambda.py passes Tune's TuneReportCallback)."""
    from twinflow.ray_env import connect

    t0 = time.time()
    check_model_folder(resolved(cfg)[1])  # a truncated weight file: one line now, not a retried worker crash
    storage = RunStorage.for_run(cfg.run.storage_path, cfg.run.name, storage_filesystem)
    existed = check_resubmission(storage, cfg)
    if existed:
        print(f"[twinflow] {storage.uri()} exists: resuming from its latest checkpoint", file=sys.stderr, flush=True)
    mlflow_env(cfg)  # its config error (mlflow: on without a tracking URI) comes before Ray starts
    connect()
    trainer = build_trainer(cfg, storage, callbacks)
    try:
        result = trainer.fit()
    except SystemExit:  # Ray Train's SIGINT handler aborts the run and exits (with code 0)
        raise KeyboardInterrupt from None
    if result.return_value is None:  # aborted (Ctrl-C): the workers never returned their summary
        raise KeyboardInterrupt
    summary = dict(result.return_value)
    outcome = TrainOutcome(summary=summary, result=result, run_uri=storage.uri(), seconds=time.time() - t0)
    if summary.get("stop_reason") == "error":
        raise RunInputError(summary["error"])
    if summary.get("stop_reason") == "nan_limit":
        raise NonFiniteLossError(
            f"training stopped at step {summary['step']}: {summary['nan_streak']} steps in a row had non-finite "
            f"losses (run.nan_limit={cfg.run.nan_limit}; {summary['skipped_steps']} skipped in all). The last good "
            f"checkpoint is in {storage.uri()}; lower optim.lr, check the data, or raise run.nan_limit")
    return outcome
