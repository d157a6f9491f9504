"""Driver-side preparation before Ray Train starts: special inputs, and the re-submission check.

``model.path: tiny`` (or ``tiny-qwen``) builds the random-weight tiny Qwen-Image once into the
cache folder (``$TWINFLOW_CACHE`` or ~/.cache/twinflow); ``data.source: digits`` writes
scikit-learn's handwritten digits (real scans, bundled with sklearn) as captioned parquet shards
there. Both are built in a temp folder and renamed into place, so an interrupted build is never
mistaken for a finished one. They are for single-machine runs: workers read the driver's disk.

Re-submitting a run name resumes it. ``check_resubmission`` compares the new config with the
``config.yaml`` the first submission left in the run folder and refuses, before Ray starts,
changes that would make the checkpoints unusable or the run something else (the model, the data,
the method, the sharding); schedule length, logging, sampling and fault settings may change.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from twinflow.config.errors import ConfigError
from twinflow.config.tree import dump_yaml, to_dict
from twinflow.models.tiny_qwen import build_once, cache_dir
from twinflow.train.config import DIGITS_SOURCE, TrainConfig
from twinflow.train.storage import RunStorage

CONFIG_FILE = "config.yaml"
DIGITS_ROWS = 512
DIGITS_SHARDS = 4

# Dotted fields a resumed run must share with the run that wrote the checkpoints.
RESUME_FIXED = ("model", "data.source", "data.format", "data.resolution", "data.crop", "twinflow",
                "deepspeed.zero_stage", "deepspeed.micro_batch_per_gpu", "deepspeed.gradient_accumulation",
                "scaling.num_workers", "run.seed")


def resolve_model_path(path: str) -> str:
    """A named model (twinflow.named: tiny, tiny-qwen, digits-base) -> its folder (built on first use);
    anything else unchanged."""
    from twinflow.named import resolve_model

    return resolve_model(path)


def resolve_data_source(source: str, resolution: int) -> str:
    """``digits`` -> a folder of captioned digit parquet shards at ``resolution`` px; other named sources
    (twinflow.named, e.g. digits-base: that base's latent cache) -> their folder; else unchanged."""
    if source != DIGITS_SOURCE:
        from twinflow.named import resolve_data_source as resolve_named

        return resolve_named(source)
    from twinflow.data.digits import write_digits_dataset

    def build(tmp: Path) -> None:
        write_digits_dataset(str(tmp), "parquet", n=DIGITS_ROWS, shards=DIGITS_SHARDS, size=resolution)
        (tmp / "_complete").write_text("ok\n")  # '_' files are invisible to the readers

    return str(build_once(cache_dir() / f"digits-{DIGITS_ROWS}-{resolution}px", "_complete", build))


def resolved(cfg: TrainConfig) -> tuple[TrainConfig, str]:
    """(config with data.source resolved, model folder or hub id) for the workers."""
    model_path = resolve_model_path(cfg.model.path)
    data = dataclasses.replace(cfg.data, source=resolve_data_source(cfg.data.source, cfg.data.resolution))
    return dataclasses.replace(cfg, data=data), model_path


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _first_difference(old, new, path: str) -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{path}.{key}")
            if diff:
                return diff
        return None
    return None if old == new else f"{path} was {old!r}, now {new!r}"


def check_resubmission(storage: RunStorage, cfg: TrainConfig) -> bool:
    """Record the config of a new run, or check a re-submitted one; True when the run existed."""
    new = to_dict(cfg)
    if storage.exists(CONFIG_FILE):
        old = yaml.safe_load(storage.read_bytes(CONFIG_FILE).decode()) or {}
        for field in RESUME_FIXED:
            diff = _first_difference(_get(old, field), _get(new, field), field)
            if diff:
                raise ConfigError(f"run.name: {storage.uri()} already holds a run and {diff}; re-submit with the same "
                                  f"settings to resume it, or choose a new run.name")
        return True
    storage.write_bytes(dump_yaml(cfg).encode(), CONFIG_FILE)
    return False
