"""Rank 0's view of a run while it trains: progress bar, TensorBoard, MLflow, the metrics log.

TensorBoard event files go to <run>/tensorboard (written in place for local storage; for S3
they are written locally and copied up at every checkpoint and at the end). A resumed run opens
its writer with ``purge_step`` = first step after the checkpoint, so TensorBoard drops what the
crashed attempt logged past that checkpoint: no step appears twice.
MLflow (``MLFLOW_TRACKING_URI`` on the driver; its other MLFLOW_* variables travel along) gets the flattened config
as params, the same metrics, and the sample grids as artifacts; a resumed run continues the
same MLflow run (its id lives in the checkpoint). MLflow keeps every logged value, so steps a
crashed attempt logged after its last checkpoint stay there as earlier values of those steps.
The metrics log (TrainState.history) is saved inside every checkpoint, so it always matches the
weights: <run>/final/metrics.jsonl holds each step exactly once.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from twinflow.config.tree import to_dict
from twinflow.train.config import TrainConfig


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


class Tracker:
    def __init__(self, cfg: TrainConfig, storage, state, resumed: bool, mlflow_env: dict[str, str] | None):
        """``storage``: train/storage.py RunStorage; ``state``: TrainState (holds the MLflow run id);
        ``mlflow_env``: the driver's MLFLOW_* variables (None: no MLflow)."""
        self.cfg = cfg
        self.storage = storage
        self.tb = None
        self.tb_local: str | None = None
        self.mlflow = None
        self.bar = None
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            if storage.remote:
                self.tb_local = tempfile.mkdtemp(prefix="twinflow-tb-")
                logdir = self.tb_local
            else:
                logdir = storage.local_path("tensorboard")
                os.makedirs(logdir, exist_ok=True)
            self.tb = SummaryWriter(logdir, purge_step=state.step + 1 if resumed else None)
        if mlflow_env:
            os.environ.update(mlflow_env)
            import mlflow

            mlflow.set_tracking_uri(mlflow_env["MLFLOW_TRACKING_URI"])
            mlflow.set_experiment(cfg.logging.mlflow_experiment)
            run = mlflow.start_run(run_id=state.mlflow_run_id) if state.mlflow_run_id else \
                mlflow.start_run(run_name=cfg.run.name)
            if not state.mlflow_run_id:
                params = {k: str(v)[:500] for k, v in flatten(to_dict(cfg)).items()}
                items = list(params.items())
                for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                    mlflow.log_params(dict(items[i:i + 100]))
                state.mlflow_run_id = run.info.run_id
            self.mlflow = mlflow
        if cfg.logging.progress_bar:
            from ray.experimental.tqdm_ray import tqdm

            self.bar = tqdm(total=cfg.run.max_steps, desc=f"train {cfg.run.name}", unit="step")
            self.bar.update(state.step)

    def log(self, step: int, row: dict[str, Any]) -> None:
        scalars = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()
                                     if v == v and abs(v) != float("inf")}, step=step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            loss = row.get("loss/total")
            if loss is not None:
                self.bar.set_description(f"train {self.cfg.run.name} loss {loss:.4f}")

    def log_image(self, step: int, image, path: str | None) -> None:
        if self.tb is not None:
            import numpy as np

            self.tb.add_image("samples", np.asarray(image), step, dataformats="HWC")
        if self.mlflow is not None and path is not None:
            self.mlflow.log_artifact(path, artifact_path="samples")

    def sync(self) -> None:
        """Flush TensorBoard and copy its files up when the run lives in remote storage."""
        if self.tb is None:
            return
        self.tb.flush()
        if self.tb_local is not None:
            self.storage.upload_dir(self.tb_local, "tensorboard")

    def close(self, final_dir: str | None = None) -> None:
        self.sync()
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            if final_dir:
                self.mlflow.set_tag("final_dir", final_dir)
            self.mlflow.end_run()
        if self.bar is not None:
            self.bar.close()


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    import json

    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
