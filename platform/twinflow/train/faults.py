"""Injected faults (config section ``debug``), to rehearse recovery in tests or on a cluster.

An exit is ``os._exit``: no exception, no cleanup, no goodbye to the process group — what a
preempted node or an OOM-killed process looks like to Ray Train. Each exit fires once per run:
it drops a marker file in ``debug.fault_marker_dir`` first, and a restarted worker that finds
the marker carries on.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from twinflow.train.config import DebugSettings


class Faults:
    def __init__(self, settings: DebugSettings, rank: int):
        self.s = settings
        self.rank = rank

    def _fire_once(self, name: str) -> None:
        marker = Path(self.s.fault_marker_dir) / name
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"rank {self.rank}\n")
        print(f"[twinflow debug] rank {self.rank}: injected exit ({name})", file=sys.stderr, flush=True)
        os._exit(17)

    def after_step(self, step: int) -> None:
        if self.s.exit_at_step == step and self.rank == self.s.exit_rank:
            self._fire_once(f"exit_at_step_{step}")

    def in_checkpoint(self, step: int) -> None:
        if self.s.exit_in_checkpoint_at_step == step and self.rank == self.s.exit_rank:
            self._fire_once(f"exit_in_checkpoint_{step}")

    def latents(self, step: int, accum_index: int, latents: torch.Tensor) -> torch.Tensor:
        """NaN latents (as from a corrupt cache row) in the first micro-batch of the listed steps, on
        rank ``nan_rank``: the network's output, the loss and every statistic become NaN."""
        if step in self.s.nan_at_steps and self.rank == self.s.nan_rank and accum_index == 0:
            return latents * float("nan")
        return latents
