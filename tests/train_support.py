"""Shared pieces of tests/test_train_*.py: the tiny configs, one digits dataset, one reference run.

Everything here runs the real job (Ray Train + DeepSpeed on 2 CPU workers, gloo) on the tiny
random-weight Qwen-Image; the reference run is cached per session so the resume and fault tests
compare against the same uninterrupted trajectory without training it twice.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from twinflow.models.lora import LoraSettings
from twinflow.train.config import RunSettings, SampleSettings, TrainConfig
from twinflow.train.presets import tiny

DIGITS_ROWS = 48  # 24 rows per rank: 12 micro-batches of 2 = 6 optimizer steps per epoch
DIGITS_BAD = {"undecodable": 1}  # one truncated image in shard 0 (1 of 25, under data.bad_share_limit 0.05)
LOSS_KEYS = ("loss/total", "loss/one_step", "loss/near_diag", "loss/any_step", "loss/fake", "loss/rectify",
             "dv_norm", "lr", "grad_norm")

_CACHE: dict = {}


def digits_dir(root: Path) -> str:
    """A parquet digits dataset (64 px, captions, DIGITS_BAD planted: skipped and counted), written once
    per session."""
    if "digits" not in _CACHE:
        from twinflow.data.digits import write_digits_dataset

        path = root / "digits"
        write_digits_dataset(str(path), "parquet", n=DIGITS_ROWS, shards=2, size=64, bad=DIGITS_BAD)
        _CACHE["digits"] = str(path)
    return _CACHE["digits"]


def tiny_config(model_dir, data_dir: str, storage: str, name: str, **sections) -> TrainConfig:
    """The tiny preset on the test model and data: ZeRO-2 LoRA + LoRA-EMA teacher, 2 CPU workers,
    micro 2 × 2 workers × 2 accumulation = global batch 8; sections override fields."""
    cfg = tiny()
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path=str(model_dir), lora=LoraSettings(rank=4, alpha=4.0)),
        data=dataclasses.replace(cfg.data, source=data_dir, decode_batch_rows=8),
        deepspeed=dataclasses.replace(cfg.deepspeed, micro_batch_per_gpu=2),
        run=RunSettings(name=name, storage_path=storage, max_steps=6, checkpoint_every=2, num_to_keep=None,
                        max_failures=0, export_pipeline=False, seed=3),
        sample=SampleSettings(prompts=["a handwritten digit three"], seeds=[0], nfe=[1, 2], height=64, width=64),
        logging=dataclasses.replace(cfg.logging, progress_bar=False, mlflow="off"),
    )
    changes = {k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()}
    return dataclasses.replace(cfg, **changes)


def history(outcome_or_path) -> list[dict]:
    """The final metrics log (one row per step) of a finished run, from <run>/final/metrics.jsonl."""
    return [json.loads(line) for line in Path(outcome_or_path).read_text().splitlines() if line.strip()]


def reference_run(model_dir, root: Path, s3_server, bucket: str):
    """The uninterrupted 6-step ZeRO-2 LoRA run on S3, with every observability feature on (once)."""
    if "reference" not in _CACHE:
        import os

        from twinflow.train.trainer import run_training

        data = digits_dir(root)
        mlruns = root / "mlruns"
        cfg = tiny_config(model_dir, data, f"{bucket}/runs", "reference",
                          run={"export_pipeline": True},
                          sample={"nfe": [1, 2, 4]},
                          logging={"mlflow": "auto", "progress_bar": True})
        # MLflow 3 wants a database backend; its file store (all mlflow-skinny can use here) is opt-in.
        os.environ.update(MLFLOW_TRACKING_URI=mlruns.as_uri(), MLFLOW_ALLOW_FILE_STORE="true")
        try:
            outcome = run_training(cfg, storage_filesystem=s3_server.filesystem())
        finally:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
        _CACHE["reference"] = (cfg, outcome, mlruns)
    return _CACHE["reference"]


ZERO3_STEPS = 2


def zero3_run(model_dir, tmp_path_factory):
    """The session's one ZeRO-3 full-parameter run (2 workers, every weight partitioned: persistence
    threshold 0), 2 steps at lr 1e-2 without warm-up (two Adam steps move every weight by ~2e-2, a
    contrast the export checks need), checkpoint at step 2, final/ with the pipeline and the sample
    grid. test_train_runs checks the run, test_export exports it. Returns (cfg, run folder, outcome)."""
    if "zero3" not in _CACHE:
        from twinflow.train.trainer import run_training

        root = tmp_path_factory.getbasetemp()
        storage = tmp_path_factory.mktemp("runs-zero3")
        cfg = tiny_config(model_dir, digits_dir(root), str(storage), "zero3",
                          model={"mode": "full", "ema": False}, twinflow={"teacher": "self"},
                          deepspeed={"zero_stage": 3, "param_persistence_threshold": 0},
                          optim={"lr": 1e-2, "warmup_steps": 0, "schedule": "constant"},
                          run={"max_steps": ZERO3_STEPS, "checkpoint_every": ZERO3_STEPS, "export_pipeline": True})
        outcome = run_training(cfg)
        _CACHE["zero3"] = (cfg, storage / "zero3", outcome)
    return _CACHE["zero3"]


def read_s3_text(s3_server, uri: str) -> str:
    fs = s3_server.filesystem()
    with fs.open_input_stream(uri.removeprefix("s3://")) as f:
        return f.read().decode()


def losses_by_step(rows: list[dict]) -> dict[int, dict]:
    return {int(r["step"]): {k: r.get(k) for k in LOSS_KEYS} for r in rows}
