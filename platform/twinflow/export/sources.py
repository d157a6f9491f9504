"""Where the trained weights come from, read safely: a training checkpoint or a run's ``final/`` folder.

    source = inspect_source(path)             # cheap: what it is, its step, completeness; no weights
    weights = read_weights(source, use_ema)   # the trained tensors (LoRA + E2, or the full transformer)

Accepted paths:
  * a training checkpoint ``<run>/checkpoint_step_NNNNNNNN/`` (train/state.py): DeepSpeed's files
    (``latest``, ``<tag>/*_model_states.pt``, ``<tag>/*_optim_states.pt``) + ``twinflow/shared.json``
    and one ``twinflow/complete_rank_<r>`` marker per rank;
  * a run's ``final/`` folder (train/export.py): ``config.yaml`` + ``lora/adapter.safetensors`` or
    ``transformer/``;
  * a run folder: its ``final/`` when the run finished, else its newest checkpoint.

ZeRO shards (any stage) are consolidated by DeepSpeed's own offline API,
``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``, on CPU with no process
group: the fp32 master weights of every rank's partition, stitched together. That API calls
``torch.load(..., weights_only=False)`` (full pickle: a crafted checkpoint runs code). It is wrapped
in ``twinflow.files.weights_only_loads()``, which sets torch's own ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``
switch for the duration (torch then unpickles with its restricted weights-only unpickler whatever
the caller passed) and allows exactly the DeepSpeed data types its checkpoints hold (enums and plain
records, nothing callable). Everything else here is safetensors, YAML (safe_load) or JSON
(train/state.py writes no pickles).

Memory at 20B: the optimizer shards are memory-mapped and the Adam moments dropped by DeepSpeed;
consolidation is lazy (``lazy_mode=True``): a full-parameter tensor is stitched only when the
exporter converts it, so host memory peaks near one exported copy of the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from twinflow.config.errors import ConfigError
from twinflow.models.target_time import E2_PREFIX
from twinflow.train.config import TrainConfig
from twinflow.train.state import (
    COMPLETE_PREFIX,
    FINAL_DIR,
    LEGACY_SHARED_FILE,
    MODULE_PREFIX,
    OPTIM_SHARD,
    SHARED_FILE,
    STATE_DIR,
    ZERO2_MODEL_FILE,
    ZERO3_MODEL_SHARD,
)

CHECKPOINT, FINAL = "checkpoint", "final"  # the two kinds of Source
_LORA_ADAPTER = re.compile(r"\.(lora_[AB])\.default\.")


class ExportError(ValueError):
    """An input the exporter cannot use (not a checkpoint, incomplete, no base model): one line, with the fix."""


# ---------------------------------------------------------------------------
# safe loading
# ---------------------------------------------------------------------------


def load_shared_state(checkpoint: Path, load_teacher: bool = False) -> dict:
    """``twinflow/shared.json`` (train/state.py); the teacher's tensors only when asked (a full-mode EMA
    teacher can be 40 GB)."""
    from twinflow.train.state import CheckpointError, read_shared_state

    try:
        return read_shared_state(checkpoint, load_teacher=load_teacher)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None


# ---------------------------------------------------------------------------
# what a path is
# ---------------------------------------------------------------------------


@dataclass
class Source:
    """A located input, checked for completeness; no weights read yet."""

    kind: str
    """checkpoint or final"""
    path: Path
    config: TrainConfig
    step: int | None
    tag: str | None = None
    """DeepSpeed tag (checkpoints)."""
    world_size: int | None = None
    zero_stage: int | None = None
    shared: dict | None = field(default=None, repr=False)
    """The checkpoint's shared state (memory-mapped), reused by read_weights."""

    @property
    def mode(self) -> str:
        return self.config.model.mode

    @property
    def has_ema(self) -> bool:
        if self.kind == FINAL:
            return self.mode == "lora" and (self.path / "lora" / "ema_adapter.safetensors").is_file()
        teacher = (self.shared or {}).get("teacher") or {}
        return self.config.twinflow.teacher == "ema" and ("ema" in teacher or "module" in teacher)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "step": self.step, "mode": self.mode, "tag": self.tag,
                "world_size": self.world_size, "zero_stage": self.zero_stage, "has_ema": self.has_ema,
                "base_model": self.config.model.path}


def inspect_source(path: str | Path) -> Source:
    """Locate and check the input; raises ExportError with what is wrong and what to pass instead."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ExportError(f"{p}: no such folder; pass a training checkpoint (<run>/checkpoint_step_…), a run's "
                          f"final/ folder or a run folder")
    if (p / STATE_DIR / SHARED_FILE).is_file() or (p / STATE_DIR / LEGACY_SHARED_FILE).is_file():
        return _inspect_checkpoint(p)
    if (p / "config.yaml").is_file() and ((p / "lora").is_dir() or (p / "transformer").is_dir()):
        return _inspect_final(p)
    if (p / FINAL_DIR / "config.yaml").is_file():
        return _inspect_final(p / FINAL_DIR)
    checkpoints = sorted(c for c in p.glob("checkpoint_*") if (c / STATE_DIR / SHARED_FILE).is_file())
    if checkpoints:
        return _inspect_checkpoint(checkpoints[-1])
    deepspeed_only = (p / "latest").is_file() or any(p.glob("*/*_model_states.pt"))
    hint = (f" (it holds DeepSpeed shards but no {STATE_DIR}/{SHARED_FILE}: not written by jobs/train_qwen.py, or "
            f"copied without its {STATE_DIR}/ folder)" if deepspeed_only else "")
    raise ExportError(f"{p} is not a TwinFlow training checkpoint (no {STATE_DIR}/{SHARED_FILE}), nor a run's final/ "
                      f"folder (config.yaml + lora/ or transformer/), nor a run folder holding either{hint}")


def _config_from(data: dict, where: str) -> TrainConfig:
    from twinflow.config.tree import from_dict

    try:
        return from_dict(TrainConfig, data)
    except ConfigError as exc:
        raise ExportError(f"{where}: the run's config does not parse with this version of twinflow ({exc})") from None


def _inspect_checkpoint(p: Path) -> Source:
    shared = load_shared_state(p)
    world, tag = int(shared["world_size"]), str(shared["tag"])
    missing = [r for r in range(world) if not (p / STATE_DIR / f"{COMPLETE_PREFIX}{r:05d}").is_file()]
    if missing:
        raise ExportError(f"{p} is incomplete: ranks {missing} of {world} never marked their shard complete "
                          f"({STATE_DIR}/complete_rank_NNNNN; a crash while it was written). Export an earlier "
                          f"checkpoint of the run")
    shards = p / tag
    if not shards.is_dir():
        raise ExportError(f"{p} is incomplete: DeepSpeed's shard folder {tag}/ is missing")
    cfg = _config_from(shared["config"], str(p / STATE_DIR / SHARED_FILE))
    stage = cfg.deepspeed.zero_stage
    optim = _ranks(shards, OPTIM_SHARD)
    model = _ranks(shards, ZERO3_MODEL_SHARD) if stage == 3 else ({0} if (shards / ZERO2_MODEL_FILE).is_file()
                                                             else set())
    expected_model = set(range(world)) if stage == 3 else {0}
    lacking = sorted(set(range(world)) - optim)
    if lacking or model != expected_model:
        what = []
        if lacking:
            what.append(f"optimizer shards of ranks {lacking}")
        if model != expected_model:
            what.append(f"model-state files of ranks {sorted(expected_model - model)}")
        raise ExportError(f"{p} is incomplete: {tag}/ lacks the {' and '.join(what)} (ZeRO-{stage}, {world} ranks); "
                          f"export an earlier checkpoint of the run")
    return Source(kind=CHECKPOINT, path=p, config=cfg, step=int(shared["state"].get("step", 0)), tag=tag,
                  world_size=world, zero_stage=stage, shared=shared)


def _ranks(folder: Path, pattern: re.Pattern) -> set[int]:
    return {int(m.group(1)) for f in folder.iterdir() if (m := pattern.match(f.name))}


def _inspect_final(p: Path) -> Source:
    import yaml

    try:
        data = yaml.safe_load((p / "config.yaml").read_text()) or {}
    except yaml.YAMLError as exc:
        raise ExportError(f"{p / 'config.yaml'}: not valid YAML ({exc})") from None
    cfg = _config_from(data, str(p / "config.yaml"))
    need = p / "lora" / "adapter.safetensors" if cfg.is_lora else p / "transformer" / "config.json"
    if not need.is_file():
        raise ExportError(f"{p} is incomplete: a {cfg.model.mode} run's final/ folder must hold {need.relative_to(p)}")
    from twinflow.files import FileProblem, check_tree

    try:
        check_tree(p)  # a truncated adapter or transformer file: one line naming it, before any work
    except FileProblem as exc:
        raise ExportError(str(exc)) from None
    step = None
    metrics = p / "metrics.jsonl"
    if metrics.is_file():
        rows = [line for line in metrics.read_text().splitlines() if line.strip()]
        if rows:
            step = json.loads(rows[-1]).get("step")
    return Source(kind=FINAL, path=p, config=cfg, step=step)


# ---------------------------------------------------------------------------
# the weights
# ---------------------------------------------------------------------------


@dataclass
class TrainedWeights:
    """What the run trained, in the model's own key names.

    LoRA: ``lora`` in ``twinflow.models.lora.lora_state_dict`` format (PEFT keys without the adapter
    name, plus E2's ``time_text_embed_2.*``). Full: ``transformer`` maps transformer keys to tensors
    (or lazy DeepSpeed tensors: call ``materialise``), or ``transformer_dir`` is a diffusers folder.
    """

    source: Source
    ema: bool
    lora: dict[str, torch.Tensor] | None = None
    transformer: dict[str, Any] | None = None
    transformer_dir: Path | None = None


def materialise(value: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor of its own from a (possibly lazy, DeepSpeed ``GatheredTensor``) state value, cast if floating.

    DeepSpeed hands out views into its stitched flat buffers; a view is copied out, since safetensors
    refuses tensors that share memory (and a view would keep the whole buffer alive)."""
    t = value.contiguous()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def read_weights(source: Source, use_ema: bool = False) -> TrainedWeights:
    if use_ema and not source.has_ema:
        teacher = source.config.twinflow.teacher
        raise ExportError(f"--use-ema: {source.path} has no EMA weights (twinflow.teacher: {teacher}"
                          + ("; a full run's final/ keeps no EMA copy, export one of its checkpoints instead"
                             if source.kind == FINAL and source.mode == "full" else "") + ")")
    if source.kind == FINAL:
        return _read_final(source, use_ema)
    return _read_checkpoint(source, use_ema)


def _read_final(source: Source, use_ema: bool) -> TrainedWeights:
    if source.mode == "full":
        return TrainedWeights(source=source, ema=False, transformer_dir=source.path / "transformer")
    from safetensors.torch import load_file

    name = "ema_adapter.safetensors" if use_ema else "adapter.safetensors"
    return TrainedWeights(source=source, ema=use_ema, lora=load_file(source.path / "lora" / name))


def _read_checkpoint(source: Source, use_ema: bool) -> TrainedWeights:
    if use_ema:
        teacher = load_shared_state(source.path, load_teacher=True)["teacher"]
        if source.mode == "lora":
            return TrainedWeights(source=source, ema=True, lora=dict(teacher["ema"]))
        return TrainedWeights(source=source, ema=True, transformer=_strip_module_prefix(teacher["module"], source))
    state = consolidate(source)
    if source.mode == "lora":
        lora = {_LORA_ADAPTER.sub(r".\1.", k): materialise(v) for k, v in _strip_module_prefix(state, source).items()}
        odd = [k for k in lora if not (k.startswith(E2_PREFIX) or ".lora_A." in k or ".lora_B." in k)]
        if odd:
            raise ExportError(f"{source.path}: trained parameters that are neither LoRA nor E2, e.g. {odd[:3]}; "
                              f"was it written by a LoRA run?")
        return TrainedWeights(source=source, ema=False, lora=lora)
    return TrainedWeights(source=source, ema=False, transformer=_strip_module_prefix(state, source))


def _strip_module_prefix(state: dict[str, Any], source: Source) -> dict[str, Any]:
    bad = [k for k in state if not k.startswith(MODULE_PREFIX)]
    if bad:
        raise ExportError(f"{source.path}: weights outside the transformer, e.g. {bad[:3]}; not a TwinFlow Qwen-Image "
                          f"checkpoint")
    return {k[len(MODULE_PREFIX):]: v for k, v in state.items()}


def consolidate(source: Source) -> dict[str, Any]:
    """DeepSpeed's offline ZeRO consolidation of a checkpoint's fp32 master weights (lazy values)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # an export box without GPUs: no CUDA probing
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from twinflow.files import weights_only_loads

    # DeepSpeed reports progress with print(); keep stdout for the job's JSON result.
    with weights_only_loads(), contextlib.redirect_stdout(sys.stderr):
        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(source.path), tag=source.tag,
                                                            exclude_frozen_parameters=source.mode == "lora",
                                                            lazy_mode=True)
        except Exception as exc:  # noqa: BLE001 - name the checkpoint and DeepSpeed's reason in one line
            first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise ExportError(f"{source.path}: DeepSpeed could not consolidate the ZeRO-{source.zero_stage} shards "
                              f"({type(exc).__name__}: {first})") from exc
