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
``check_same_config`` is that check for any recorded config (tune/sweep.py checks sweep.yaml with it).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import yaml

from twinflow.config.errors import ConfigError
from twinflow.config.tree import dump_yaml, from_dict, to_dict
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


def _strip(d: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.get(p, {})
    d.pop(last, None)


def _first_difference(old, new, path: str) -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if diff:
                return diff
        return None
    return None if old == new else f"{path} was {old!r}, now {new!r}"


def config_difference(old: dict, new: dict, fixed: tuple[str, ...] = (),
                      may_change: tuple[str, ...] = ()) -> str | None:
    """The first difference between two config dicts that matters, as "<dotted> was X, now Y"; None when
    none. Only the dotted fields ``fixed`` are compared when given, else everything but ``may_change``."""
    if fixed:
        for dotted in fixed:
            diff = _first_difference(_get(old, dotted), _get(new, dotted), dotted)
            if diff:
                return diff
        return None
    old, new = copy.deepcopy(old), copy.deepcopy(new)
    for d in (old, new):
        for dotted in may_change:
            _strip(d, dotted)
    return _first_difference(old, new, "")


def check_same_config(storage: RunStorage, file: str, cfg, refusal: str, fixed: tuple[str, ...] = (),
                      may_change: tuple[str, ...] = (), normalise=None) -> bool:
    """The "same run, same config?" check of a re-submission (runs here, sweeps in tune/sweep.py).

    The first submission records ``cfg`` as ``file`` in ``storage``; a later one is compared with that
    record (``config_difference``) and refused with ``ConfigError(refusal)`` when it differs, where
    ``{uri}`` and ``{diff}`` in ``refusal`` name the folder and the difference. True: the record existed."""
    if not storage.exists(file):
        storage.write_bytes(dump_yaml(cfg).encode(), file)
        return False
    old = yaml.safe_load(storage.read_bytes(file).decode()) or {}
    try:  # read through today's config class: a field added since the record was written takes its default
        old = to_dict(from_dict(type(cfg), old))
    except ConfigError:
        pass  # a field since removed or renamed: compare the record as written
    new = to_dict(cfg)
    if normalise is not None:  # defaults that resolve to the same thing compare equal (e.g. "the family's")
        old, new = normalise(old), normalise(new)
    diff = config_difference(old, new, fixed, may_change)
    if diff:
        raise ConfigError(refusal.format(uri=storage.uri(), diff=diff))
    return True


def check_resubmission(storage: RunStorage, cfg: TrainConfig) -> bool:
    """Record the config of a new run, or check a re-submitted one; True when the run existed."""
    return check_same_config(storage, CONFIG_FILE, cfg, fixed=RESUME_FIXED, normalise=resolved_model_section,
                             refusal="run.name: {uri} already holds a run and {diff}; re-submit with the same "
                                     "settings to resume it, or choose a new run.name")


def resolved_model_section(config: dict) -> dict:
    """``config`` with ``model.family: auto`` and empty ``model.lora.targets`` replaced by what they resolve
    to, so that a run recorded before those defaults existed (or with them spelled out) resumes."""
    from twinflow.config.tree import from_dict as _from_dict
    from twinflow.models.config import ModelConfig

    out = copy.deepcopy(config)
    model = out.get("model")
    if not isinstance(model, dict):
        return out
    try:
        mcfg = _from_dict(ModelConfig, model, "model")
        model["family"] = mcfg.backbone().name
        model.setdefault("lora", {})["targets"] = mcfg.lora_targets()
    except (ConfigError, OSError, ValueError):
        pass  # unresolvable here: compare as written
    return out
