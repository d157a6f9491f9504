"""What a checkpoint holds besides DeepSpeed's shards, and how it is written and read back.

Layout of one checkpoint directory (each rank writes into its own temp dir; Ray Train merges the
ranks' files into one directory in storage):

    latest, <tag>/...                  DeepSpeed: module (trainable part for LoRA), ZeRO optimizer
                                       shards, LR scheduler, zero_to_fp32.py (engine.save_checkpoint)
    twinflow/shared.pt                 rank 0: TrainState (step, data position, counters, metric
                                       history, MLflow run id), teacher state (EMA), world size, tag
    twinflow/rank_<r>.pt               every rank: its RNG streams (python, numpy, torch, CUDA, the
                                       objective's generator)
    twinflow/complete_rank_<r>         every rank, written last: this rank's shard is whole
    samples/step_<step>.png            rank 0: the sample grid at this step

A resumed run restores all of it; ``check_complete`` refuses a directory that lacks any rank's
marker (it could only come from a crash mid-write, which Ray never registers, but a user may
point at one by hand).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_DIR = "twinflow"
SHARED_FILE = "shared.pt"
SAMPLES_DIR = "samples"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (incomplete, other world size)."""


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


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def complete_marker(rank: int) -> str:
    return f"complete_rank_{rank:05d}"


# ---------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------


def capture_rng(generator: torch.Generator | None) -> dict[str, Any]:
    out: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        out["generator"] = generator.get_state()
    return out


def restore_rng(state: dict[str, Any], generator: torch.Generator | None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------
# writing and reading
# ---------------------------------------------------------------------------


def write_rank_state(root: str | Path, rank: int, generator: torch.Generator | None) -> None:
    d = Path(root) / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"rng": capture_rng(generator)}, d / rank_file(rank))


def write_shared_state(root: str | Path, state: TrainState, teacher_state: dict | None, world_size: int,
                       tag: str, config: dict) -> None:
    d = Path(root) / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"state": state.to_dict(), "teacher": teacher_state, "world_size": world_size, "tag": tag,
                "config": config}, d / SHARED_FILE)


def mark_complete(root: str | Path, rank: int) -> None:
    (Path(root) / STATE_DIR / complete_marker(rank)).write_text(json.dumps({"rank": rank}))


def check_complete(root: str | Path, world_size: int) -> dict:
    """The shared state of a checkpoint dir, after checking that every rank finished writing it."""
    d = Path(root) / STATE_DIR
    if not (d / SHARED_FILE).is_file():
        raise CheckpointError(f"{root}: not a TwinFlow training checkpoint (no {STATE_DIR}/{SHARED_FILE})")
    shared = torch.load(d / SHARED_FILE, map_location="cpu", weights_only=False)
    if shared["world_size"] != world_size:
        raise CheckpointError(f"{root} was written by {shared['world_size']} workers; ZeRO shards are per rank, so "
                              f"resume with scaling.num_workers: {shared['world_size']} (now {world_size})")
    missing = [r for r in range(world_size) if not (d / complete_marker(r)).is_file()]
    if missing:
        raise CheckpointError(f"{root} is incomplete: ranks {missing} did not finish writing their shard")
    return shared


def read_rank_state(root: str | Path, rank: int) -> dict:
    return torch.load(Path(root) / STATE_DIR / rank_file(rank), map_location="cpu", weights_only=False)
