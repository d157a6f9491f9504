"""Rehearse a launcher YAML's autoscaling on one machine with Ray's own autoscaler.

    python cluster/local_autoscaling.py cluster/aws.yaml            # prints RAY_ADDRESS; Ctrl-C stops
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<printed> RAY_ADDRESS=<printed> python my_probe.py

Ray's fake multi-node provider (``RAY_FAKE_CLUSTER=1 ray start --autoscaling-config ...``) runs
the real autoscaler, and "launches" each node as one more raylet on this machine. The node types
are derived from the launcher YAML (``cluster/aws.yaml``, ``cluster/gcp.yaml``) so what scales
here is what scales in the cloud:

* GPU counts and the ``twinflow_*`` custom resources are kept as they are (logical resources:
  a fake 8-GPU node needs no GPU), CPUs shrink to ``cpus_per_node`` so several nodes fit on a
  laptop, the object store shrinks to ``object_store_bytes``;
* ``min_workers`` is kept, ``max_workers`` is capped at ``max_workers_per_type``;
* the idle timeout is shortened (``idle_timeout_minutes``) so scale-down shows within seconds.

The cluster is private to the process that starts it: its own temp dir, GCS/client/agent ports
picked free, its own auth token (never ``~/.ray/auth_token``), and a shutdown that ends only the
processes it started. It never calls ``ray stop``, which would kill every Ray on the machine
(``ray.cluster_utils.AutoscalingCluster`` does exactly that, so it is not used here).
"""

from __future__ import annotations

import argparse
import atexit
import copy
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

# The fake provider tags its head node with this node type name (FAKE_HEAD_NODE_TYPE).
FAKE_HEAD_TYPE = "ray.head.default"
MIN_OBJECT_STORE_BYTES = 80 * 1024 * 1024  # Ray refuses less than 75 MiB


def load_launcher_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a launcher YAML the way ``ray up`` does before it touches a cloud: fill in the
    provider's defaults, then validate against Ray's cluster-config schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(path) as f:
        raw = yaml.safe_load(f)
    config = prepare_config(raw)
    validate_config(config)
    return config


def _shrink(resources: dict[str, Any], cpus: int, object_store_bytes: int) -> dict[str, int]:
    """Cloud node resources -> fake node resources: GPUs and custom resources stay (logical),
    CPUs shrink to fit this machine."""
    fake = {k: int(v) for k, v in resources.items() if k not in ("CPU", "memory", "object_store_memory")}
    fake["CPU"] = min(int(resources.get("CPU", cpus)), cpus)
    fake["object_store_memory"] = int(object_store_bytes)
    return fake


def derive_fake_node_types(
    launcher_config: dict[str, Any],
    *,
    cpus_per_node: int = 1,
    max_workers_per_type: int = 2,
    object_store_bytes: int = MIN_OBJECT_STORE_BYTES,
) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """Return ``(head_resources, worker_node_types)`` scaled down from a launcher config."""
    types = launcher_config["available_node_types"]
    head_name = launcher_config["head_node_type"]
    head = _shrink(types[head_name].get("resources", {}), cpus_per_node, object_store_bytes)
    workers = {}
    for name, spec in types.items():
        if name == head_name:
            continue
        if name == FAKE_HEAD_TYPE:
            raise ValueError(f"worker node type may not be named {FAKE_HEAD_TYPE!r} (the fake head's name)")
        workers[name] = {
            "resources": _shrink(spec.get("resources", {}), cpus_per_node, object_store_bytes),
            "node_config": {},
            "min_workers": int(spec.get("min_workers", 0)),
            "max_workers": min(int(spec.get("max_workers", max_workers_per_type)), max_workers_per_type),
        }
    return head, workers


def fake_autoscaling_config(
    launcher_config: dict[str, Any],
    *,
    gcs_address: str,
    idle_timeout_minutes: float = 0.1,
    **shrink: Any,
) -> dict[str, Any]:
    """A complete autoscaling config for the fake multi-node provider, validated by Ray.

    The monitor reads this file as is (it does not fill defaults), so every legacy field the
    autoscaler indexes is present, empty."""
    from ray.autoscaler._private.constants import DISABLE_LAUNCH_CONFIG_CHECK_KEY, DISABLE_NODE_UPDATERS_KEY
    from ray.autoscaler._private.util import validate_config

    _, workers = derive_fake_node_types(launcher_config, **shrink)
    node_types = copy.deepcopy(workers)
    # The fake head is started by `ray start` with these resources, never launched.
    node_types[FAKE_HEAD_TYPE] = {"resources": {}, "node_config": {}, "min_workers": 0, "max_workers": 0}
    config = {
        "cluster_name": f"{launcher_config['cluster_name']}-local",
        "max_workers": sum(t["max_workers"] for t in workers.values()),
        "upscaling_speed": launcher_config.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            # Fake nodes share one IP; the autoscaler tells them apart by node id.
            "use_node_id_as_ip": True,
            DISABLE_NODE_UPDATERS_KEY: True,
            DISABLE_LAUNCH_CONFIG_CHECK_KEY: True,
        },
        "auth": {},
        "docker": {},
        "available_node_types": node_types,
        "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
    validate_config(config)
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _ray_cli() -> list[str]:
    exe = Path(sys.executable).with_name("ray")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


class LocalAutoscalingCluster:
    """A private fake multi-node cluster whose node types come from a launcher YAML.

    Use as a context manager; ``address`` and ``env`` tell a driver how to connect."""

    def __init__(
        self,
        launcher_yaml: str | os.PathLike,
        *,
        idle_timeout_minutes: float = 0.1,
        cpus_per_node: int = 1,
        max_workers_per_type: int = 2,
        object_store_bytes: int = MIN_OBJECT_STORE_BYTES,
    ):
        self.launcher_yaml = Path(launcher_yaml)
        self.launcher_config = load_launcher_config(self.launcher_yaml)
        self._shrink = dict(
            cpus_per_node=cpus_per_node,
            max_workers_per_type=max_workers_per_type,
            object_store_bytes=object_store_bytes,
        )
        self.idle_timeout_minutes = idle_timeout_minutes
        self.proc: subprocess.Popen | None = None
        self.temp_dir: Path | None = None
        self.address: str | None = None
        self.config: dict[str, Any] | None = None
        atexit.register(self.shutdown)  # also on an interpreter exit that skips __exit__

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout_s: float = 180.0, attempts: int = 3) -> "LocalAutoscalingCluster":
        """Start the head (the autoscaler runs inside it). On a loaded machine `ray start` can
        give up waiting for its own raylet (a fixed 30 s in Ray); each retry starts afresh with
        a new temp dir and new ports, after ending whatever the failed attempt left."""
        failures = []
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(timeout_s)
            except (RuntimeError, TimeoutError) as e:
                failures.append(f"attempt {attempt}: {e}")
                self.shutdown()
        raise RuntimeError("local autoscaling cluster did not start:\n" + "\n".join(failures))

    def _start_once(self, timeout_s: float) -> "LocalAutoscalingCluster":
        import ray

        # Short root: Ray's unix socket paths live under it and must stay below ~107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="tfray_", dir="/tmp"))
        port = _free_port()
        self.address = f"{ray.util.get_node_ip_address()}:{port}"
        self.config = fake_autoscaling_config(
            self.launcher_config,
            gcs_address=self.address,
            idle_timeout_minutes=self.idle_timeout_minutes,
            **self._shrink,
        )
        head, _ = derive_fake_node_types(self.launcher_config, **self._shrink)
        config_path = self.temp_dir / "autoscaling.yaml"
        config_path.write_text(json.dumps(self.config, indent=1))
        token_path = self.temp_dir / "auth_token"
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)

        custom = {k: v for k, v in head.items() if k not in ("CPU", "GPU", "object_store_memory")}
        cmd = _ray_cli() + [
            "start", "--head", "--block",
            f"--port={port}",
            f"--temp-dir={self.temp_dir}",
            f"--autoscaling-config={config_path}",
            f"--num-cpus={head['CPU']}",
            f"--num-gpus={head.get('GPU', 0)}",
            f"--object-store-memory={head['object_store_memory']}",
            f"--resources={json.dumps(custom)}",
            "--include-dashboard=false",
            # Fixed defaults (10001, 52365) would collide with any other Ray head on the machine.
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            "--disable-usage-stats",
        ]  # fmt: skip
        log_path = self.temp_dir / "ray_start.log"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                env={**os.environ, **self.auth_env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # our own process group: a Ctrl-C in the terminal reaches us, not Ray
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = log_path.read_text(errors="replace")
            if "Ray runtime started" in text:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {self.proc.returncode}:\n{self._diagnostics()}")
            time.sleep(0.5)
        raise TimeoutError(f"head not up after {timeout_s:.0f}s:\n{self._diagnostics()}")

    def _diagnostics(self, chars: int = 1500) -> str:
        """Tails of the logs that say why a start failed (the temp dir is removed afterwards)."""
        out = []
        logs = ("raylet.err", "raylet.out", "gcs_server.err")
        for pattern in ("ray_start.log", *(f"session_*/logs/{name}" for name in logs)):
            for p in sorted({q.resolve() for q in self.temp_dir.glob(pattern)}):
                text = p.read_text(errors="replace").strip()
                if text:
                    out.append(f"--- {p.name}\n{text[-chars:]}")
        return "\n".join(out)

    @property
    def auth_env(self) -> dict[str, str]:
        """Token auth with this cluster's private token (every node and driver uses it)."""
        assert self.temp_dir is not None, "start() first"
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.temp_dir / "auth_token")}

    @property
    def env(self) -> dict[str, str]:
        """Environment a driver process needs to connect: address and private token."""
        assert self.address is not None, "start() first"
        return {"RAY_ADDRESS": self.address, **self.auth_env}

    def monitor_log(self) -> str:
        """The autoscaler's own log (what it launched and terminated, and why)."""
        if self.temp_dir is None:
            return ""
        # session_latest is a symlink to the session dir: read each file once.
        files = {p.resolve() for p in self.temp_dir.glob("session_*/logs/monitor.*") if p.is_file()}
        return "\n".join(p.read_text(errors="replace") for p in sorted(files))

    def _own_pids(self) -> set[int]:
        """Processes this cluster started: the `ray start` tree, plus anything (fake nodes'
        raylets and workers, reparented when their parent exits) whose command line names our
        private temp dir."""
        import psutil

        pids: set[int] = set()
        if self.proc is not None:
            try:
                root = psutil.Process(self.proc.pid)
                pids.add(root.pid)
                pids.update(c.pid for c in root.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        if self.temp_dir is not None:
            marker = str(self.temp_dir)
            me = os.getuid()
            for p in psutil.process_iter(["pid", "uids", "cmdline"]):
                try:
                    mine = p.info["uids"] is not None and p.info["uids"].real == me
                    if mine and any(marker in a for a in p.info["cmdline"] or ()):
                        pids.add(p.info["pid"])
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
        pids.discard(os.getpid())
        return pids

    def shutdown(self, grace_s: float = 10.0) -> None:
        """End every process of this cluster (and only those), then remove its temp dir."""
        import psutil

        if self.proc is None and self.temp_dir is None:
            return
        if self.proc is not None and self.proc.poll() is None:
            # `ray start --block` stops the head's processes itself on SIGTERM.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        for sig, wait in ((signal.SIGTERM, grace_s / 2), (signal.SIGKILL, 5.0)):
            procs = []
            for pid in self._own_pids():
                try:
                    p = psutil.Process(pid)
                    p.send_signal(sig)
                    procs.append(p)
                except psutil.NoSuchProcess:
                    continue
            if not procs:
                break
            psutil.wait_procs(procs, timeout=wait)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.proc = None
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def __enter__(self) -> "LocalAutoscalingCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("launcher_yaml", help="cluster/aws.yaml or cluster/gcp.yaml")
    parser.add_argument("--idle-timeout-minutes", type=float, default=0.5)
    parser.add_argument("--max-workers-per-type", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="print the derived autoscaling config and exit")
    args = parser.parse_args(argv)
    cluster = LocalAutoscalingCluster(
        args.launcher_yaml,
        idle_timeout_minutes=args.idle_timeout_minutes,
        max_workers_per_type=args.max_workers_per_type,
    )
    if args.dry_run:
        cfg = fake_autoscaling_config(
            cluster.launcher_config, gcs_address="127.0.0.1:6379", idle_timeout_minutes=args.idle_timeout_minutes
        )
        print(yaml.safe_dump(cfg, sort_keys=False))
        return 0
    with cluster:
        for k, v in cluster.env.items():
            print(f"export {k}={v}")
        print("# autoscaler log:", *sorted(cluster.temp_dir.glob("session_*/logs/monitor.log")), flush=True)
        try:
            while cluster.proc is not None and cluster.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
