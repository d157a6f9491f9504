"""Shared test fixtures.

Ray workers are separate processes that import ``twinflow`` by name; exporting the tree under
test on PYTHONPATH before any local Ray starts makes them import this checkout, not whatever
copy happens to be installed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_paths = [str(ROOT / "platform"), str(ROOT)]
os.environ["PYTHONPATH"] = os.pathsep.join(_paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
for p in reversed(_paths):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (4 logical CPUs on 2 cores, so Ray Data
    and fractional-CPU Train workers can be scheduled side by side)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_qwen_image(tmp_path_factory):
    """A random-weight Qwen-Image pipeline folder in diffusers' layout (preset "tiny"), built once
    per session; tests must not modify it (copy or save elsewhere)."""
    from twinflow.models.tiny_qwen import build_tiny_qwen_image

    return build_tiny_qwen_image(tmp_path_factory.mktemp("tiny-qwen-image") / "pipe", preset="tiny", seed=0)
