"""What a checkpoint holds besides DeepSpeed's shards, and how it is written and read back.

Layout of one checkpoint directory (each rank writes into its own temp dir; Ray Train merges the
ranks' files into one directory in storage):

    latest, <tag>/...                  DeepSpeed: module (trainable part for LoRA), ZeRO optimizer
                                       shards, LR scheduler, zero_to_fp32.py (engine.save_checkpoint)
    twinflow/shared.json               rank 0: TrainState (step, data position, counters, metric
                                       history, MLflow run id), world size, tag, config, the teacher's
                                       scalars
    twinflow/teacher.safetensors       rank 0: the teacher's tensors (EMA weights / EMA adapter)
    twinflow/fake_score.safetensors    rank 0, DMD2 / VSD only: the fake score's weights and AdamW state
                                       (train/fake_score.py; its scalars in shared.json)
    fake_score/latest, fake_score/<tag>/   DMD2 / VSD under ZeRO-3: the fake score's own DeepSpeed engine's
                                       shards, every rank (instead of fake_score.safetensors)
    twinflow/rank_<r>.json             every rank: its RNG streams (python, numpy, torch, CUDA, the
    twinflow/rank_<r>.safetensors        objective's generator): scalars in JSON, state arrays here
    twinflow/complete_rank_<r>         every rank, written last: this rank's shard is whole
    samples/step_<step>.png            rank 0: the sample grid at this step

A resumed run restores all of it; ``check_complete`` refuses a directory that lacks any rank's
marker (it could only come from a crash mid-write, which Ray never registers, but a user may
point at one by hand).

Nothing the platform writes here is a pickle: loading a checkpoint never runs code from it.
DeepSpeed's own files (``<tag>/*.pt``) are pickles; ``load_deepspeed_checkpoint`` reads them with
torch's weights-only unpickler forced on (twinflow.files.weights_only_loads), so a crafted one is
refused with a CheckpointError naming the file. Checkpoints of older versions (``shared.pt``,
pickled RNG state) are refused for the same reason.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The layout of a run on storage, in one place (this module writes the state; export/sources.py reads it).
FINAL_DIR = "final"  # <run>/final: the end-of-run artefact (train/export.py)
STATE_DIR = "twinflow"  # <checkpoint>/twinflow: our own state beside DeepSpeed's files
SHARED_FILE = "shared.json"
TEACHER_FILE = "teacher.safetensors"
FAKE_SCORE_FILE = "fake_score.safetensors"
FAKE_SCORE_DIR = "fake_score"  # beside <tag>/: the ZeRO-3 fake score engine's own checkpoint
_STATE_TENSOR_FILES = {"teacher": TEACHER_FILE, "fake_score": FAKE_SCORE_FILE}
"""shared.json keys whose tensors live in their own safetensors file beside it."""
LEGACY_SHARED_FILE = "shared.pt"
SAMPLES_DIR = "samples"
COMPLETE_PREFIX = "complete_rank_"
# DeepSpeed's files inside <checkpoint>/<tag>/ (its own names; ZeRO-2 keeps one model file, ZeRO-3 one per rank)
OPTIM_SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
ZERO3_MODEL_SHARD = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_\d+_model_states\.pt$")
ZERO2_MODEL_FILE = "mp_rank_00_model_states.pt"
MODULE_PREFIX = "transformer."
"""The training engine wraps the transformer in QwenImageVelocity: its state-dict keys start with this."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (incomplete, other world size, unreadable, unsafe)."""


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done (skipped non-finite steps included: their data is consumed)."""
    epoch: int = 0
    micro_in_epoch: int = 0
    """Position of the next micro-batch in this epoch of the rank's data shard."""
    skipped_steps: int = 0
    nan_streak: int = 0
    samples_seen: int = 0
    mlflow_run_id: str | None = None
    resumed_from: list[int] = field(default_factory=list)
    """The step of each checkpoint this run was resumed from (restarts and re-submissions), in order."""
    history: list[dict] = field(default_factory=list)
    """One metrics row per logged step (rank 0): the run's log, consistent with its checkpoints."""

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "TrainState":
        return TrainState(**d)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int, suffix: str = ".json") -> str:
    return f"rank_{rank:05d}{suffix}"


def complete_marker(rank: int) -> str:
    return f"{COMPLETE_PREFIX}{rank:05d}"


# ---------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------


def capture_rng(generator: torch.Generator | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able scalars, tensors) of every RNG stream a rank draws from."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta: dict[str, Any] = {"python": {"version": version, "state": list(internal), "gauss": gauss},
                            "numpy": {"name": name, "pos": int(pos), "has_gauss": int(has_gauss),
                                      "cached_gaussian": float(cached)}}
    tensors = {"numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
               "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = st
    if generator is not None:
        tensors["generator"] = generator.get_state()
    return meta, tensors


def restore_rng(meta: dict[str, Any], tensors: dict[str, torch.Tensor], generator: torch.Generator | None) -> None:
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npm = meta["numpy"]
    np.random.set_state((npm["name"], tensors["numpy_keys"].numpy().astype(np.uint32), npm["pos"],
                         npm["has_gauss"], npm["cached_gaussian"]))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if generator is not None and "generator" in tensors:
        generator.set_state(tensors["generator"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------
# tensor trees: nested dicts of tensors and scalars -> (JSON, safetensors)
# ---------------------------------------------------------------------------

_TENSOR = "__tensor__"


def split_tensors(tree: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Replace every tensor in a nested dict/list by {"__tensor__": key}; returns (JSON-able tree, tensors)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().to("cpu").contiguous()
            return {_TENSOR: path}
        if isinstance(node, dict):
            return {str(k): walk(v, f"{path}/{k}" if path else str(k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(node)]
        return node

    return walk(tree, prefix), tensors


def join_tensors(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``split_tensors``."""
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            return tensors[tree[_TENSOR]]
        return {k: join_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [join_tensors(v, tensors) for v in tree]
    return tree


# ---------------------------------------------------------------------------
# writing and reading
# ---------------------------------------------------------------------------


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors sharing memory (tied weights); clones are whole tensors of their own.
    save_file({k: v.clone() for k, v in tensors.items()}, str(path))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from twinflow.files import FileProblem, check_safetensors

    try:
        check_safetensors(path)
    except FileProblem as exc:
        raise CheckpointError(str(exc)) from None
    return load_file(str(path))


def _read_json(path: Path) -> Any:
    from twinflow.files import FileProblem, check_json

    try:
        return check_json(path)
    except FileProblem as exc:
        raise CheckpointError(str(exc)) from None


def write_rank_state(root: str | Path, rank: int, generator: torch.Generator | None) -> None:
    d = Path(root) / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    meta, tensors = capture_rng(generator)
    _save_tensors(tensors, d / rank_file(rank, ".safetensors"))
    (d / rank_file(rank)).write_text(json.dumps({"rank": rank, "rng": meta}))


def write_shared_state(root: str | Path, state: TrainState, teacher_state: dict | None, world_size: int,
                       tag: str, config: dict, fake_score_state: dict | None = None) -> None:
    d = Path(root) / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    shared = {"state": state.to_dict(), "world_size": world_size, "tag": tag, "config": config}
    for key, tree in (("teacher", teacher_state), ("fake_score", fake_score_state)):
        file = _STATE_TENSOR_FILES[key]
        scalars, tensors = split_tensors(tree) if tree is not None else (None, {})
        if tensors:
            _save_tensors(tensors, d / file)
        shared[key] = scalars
    (d / SHARED_FILE).write_text(json.dumps(shared))


def read_shared_state(root: str | Path, load_teacher: bool = True) -> dict:
    """``twinflow/shared.json`` (+ the teacher's and fake score's tensors when ``load_teacher``);
    CheckpointError when it is missing, unreadable or of the older pickle-based layout."""
    d = Path(root) / STATE_DIR
    if not (d / SHARED_FILE).is_file():
        if (d / LEGACY_SHARED_FILE).is_file():
            raise CheckpointError(f"{root}: written by an older twinflow whose state files are pickles "
                                  f"({STATE_DIR}/{LEGACY_SHARED_FILE}); loading them could run code, so they are not "
                                  f"read: start a new run.name (or export the checkpoint with that older version)")
        raise CheckpointError(f"{root}: not a TwinFlow training checkpoint (no {STATE_DIR}/{SHARED_FILE})")
    shared = _read_json(d / SHARED_FILE)
    missing = [k for k in ("state", "world_size", "tag", "config") if not isinstance(shared, dict) or k not in shared]
    if missing:
        raise CheckpointError(f"{d / SHARED_FILE}: lacks {missing}; not written by jobs/train_qwen.py")
    shared.setdefault("fake_score", None)
    for key, file in _STATE_TENSOR_FILES.items():
        if shared.get(key) is None or not load_teacher:
            continue
        tensors = _load_tensors(d / file) if (d / file).is_file() else {}
        try:
            shared[key] = join_tensors(shared[key], tensors)
        except KeyError as exc:
            raise CheckpointError(f"{d / file}: lacks the {key.replace('_', ' ')} tensor {exc}; the checkpoint is "
                                  f"incomplete") from None
    return shared


def mark_complete(root: str | Path, rank: int) -> None:
    (Path(root) / STATE_DIR / complete_marker(rank)).write_text(json.dumps({"rank": rank}))


def missing_ranks(root: str | Path, world_size: int) -> list[int]:
    d = Path(root) / STATE_DIR
    return [r for r in range(world_size) if not (d / complete_marker(r)).is_file()]


def check_complete(root: str | Path, world_size: int) -> dict:
    """The shared state of a checkpoint dir, after checking that every rank finished writing it."""
    shared = read_shared_state(root)
    if shared["world_size"] != world_size:
        raise CheckpointError(f"{root} was written by {shared['world_size']} workers; ZeRO shards are per rank, so "
                              f"resume with scaling.num_workers: {shared['world_size']} (now {world_size})")
    missing = missing_ranks(root, world_size)
    if missing:
        raise CheckpointError(f"{root} is incomplete: ranks {missing} did not finish writing their shard")
    return shared


def read_rank_state(root: str | Path, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """(RNG scalars, RNG tensors) of ``rank``."""
    d = Path(root) / STATE_DIR
    meta_path, tensor_path = d / rank_file(rank), d / rank_file(rank, ".safetensors")
    for path in (meta_path, tensor_path):
        if not path.is_file():
            raise CheckpointError(f"{root} is incomplete: {STATE_DIR}/{path.name} is missing")
    meta = _read_json(meta_path)
    if not isinstance(meta, dict) or "rng" not in meta:
        raise CheckpointError(f"{meta_path}: lacks the RNG state; not written by jobs/train_qwen.py")
    return meta["rng"], _load_tensors(tensor_path)


def load_deepspeed_checkpoint(engine, root: str | Path, tag: str, **kwargs) -> None:
    """``engine.load_checkpoint`` with every pickle read weights-only; CheckpointError naming the
    checkpoint when DeepSpeed's files are refused or unreadable."""
    from twinflow.files import one_line, refused_pickle, weights_only_loads

    try:
        with weights_only_loads():
            path, _ = engine.load_checkpoint(str(root), tag=tag, **kwargs)
    except Exception as exc:  # noqa: BLE001 - named and explained below; Ray must not retry it
        refused = refused_pickle(exc)
        if refused:
            raise CheckpointError(f"{root}/{tag}: a DeepSpeed file holds a pickle that would run code when loaded "
                                  f"(it needs {refused}); refused. Resume from a checkpoint this platform wrote, "
                                  f"or delete this one") from None
        raise CheckpointError(f"{root}/{tag}: DeepSpeed could not load it ({one_line(exc)})") from None
    if path is None:
        raise CheckpointError(f"{root}: DeepSpeed found no checkpoint with tag {tag} (the {tag}/ folder is missing)")
