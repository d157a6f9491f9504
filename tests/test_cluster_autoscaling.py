"""Ray's own autoscaler, run on node types derived from cluster/aws.yaml.

``cluster/local_autoscaling.py`` starts a private fake multi-node cluster (``RAY_FAKE_CLUSTER=1
ray start --autoscaling-config ...``): the real v1 autoscaler (what ``ray up`` runs on the head)
launches and terminates "nodes" that are extra raylets on this machine. The node types come from
cluster/aws.yaml with GPU counts and twinflow_* resources kept as logical resources, CPUs shrunk
to 1, and a 15-second idle timeout.

One driver process (this file run as a script, so the test process never joins the cluster and
cannot disturb another test's Ray) plays a small platform session and reports what happened:

1. two Ray Train-like workers ask {"GPU": 1, "twinflow_train": 1}: a training node appears from 0;
2. while that node still has 6 free GPUs, an eval actor asks {"GPU": 1, "twinflow_eval": 1} and
   decode tasks ask {"twinflow_data": 1}: they must get their own node types, not the free GPUs;
3. everything is released: every worker node must be gone after the idle timeout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
IDLE_TIMEOUT_MINUTES = 0.25  # 15 s (the cloud configs use 10 min): longer than the driver needs to look
PLACE_TIMEOUT_S = 120  # generous: starting a fake node is a raylet + agents on a loaded 2-core box
SCALE_DOWN_DEADLINE_S = 120

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _local_autoscaling():
    path = CLUSTER / "local_autoscaling.py"
    spec = importlib.util.spec_from_file_location("twinflow_cluster_local_autoscaling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- the driver process
def _driver() -> None:
    import ray

    from twinflow.ray_resources import DATA, EVAL, TRAIN

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    report: dict = {}

    def alive() -> dict[str, dict]:
        return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}

    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    # The platform's requests (platform/twinflow/ray_resources.py). num_cpus=0: the fake nodes
    # have one logical CPU each, and CPU packing is not what is under test.
    @ray.remote(num_cpus=0, num_gpus=1, resources={TRAIN: 1})
    class TrainWorker:
        def node(self):
            return where()

    @ray.remote(num_cpus=0, num_gpus=1, resources={EVAL: 1})
    class EvalActor:
        def node(self):
            return where()

    @ray.remote(num_cpus=0, resources={DATA: 1})
    def decode(i):
        return where()

    report["before"] = alive()
    t0 = time.monotonic()
    train = [TrainWorker.remote() for _ in range(2)]
    report["train_nodes"] = ray.get([w.node.remote() for w in train], timeout=PLACE_TIMEOUT_S)
    report["train_seconds"] = time.monotonic() - t0
    report["alive_after_train"] = alive()

    t0 = time.monotonic()
    ev = EvalActor.remote()
    report["eval_node"] = ray.get(ev.node.remote(), timeout=PLACE_TIMEOUT_S)
    report["data_nodes"] = ray.get([decode.remote(i) for i in range(3)], timeout=PLACE_TIMEOUT_S)
    report["eval_data_seconds"] = time.monotonic() - t0
    report["alive_at_eval"] = alive()

    for actor in train + [ev]:
        ray.kill(actor)
    t0 = time.monotonic()
    while time.monotonic() - t0 < SCALE_DOWN_DEADLINE_S and len(alive()) > 1:
        time.sleep(1)
    report["scale_down_seconds"] = time.monotonic() - t0
    report["after"] = alive()
    print("REPORT " + json.dumps(report), flush=True)


# --------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def session():
    """Start the cluster, run the driver once, stop the cluster; tests read the outcome."""
    la = _local_autoscaling()
    cluster = la.LocalAutoscalingCluster(CLUSTER / "aws.yaml", idle_timeout_minutes=IDLE_TIMEOUT_MINUTES)
    outcome: dict = {"derived": None}
    t_start = time.monotonic()
    try:
        cluster.start(timeout_s=90, attempts=3)
        outcome["derived"] = cluster.config
        outcome["head_seconds"] = time.monotonic() - t_start
        proc = subprocess.run(
            [sys.executable, __file__, "--driver"],
            env={**os.environ, **cluster.env},
            capture_output=True,
            text=True,
            timeout=PLACE_TIMEOUT_S * 2 + SCALE_DOWN_DEADLINE_S + 60,
        )
        outcome["monitor_log"] = cluster.monitor_log()
        lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
        assert proc.returncode == 0 and lines, (
            f"driver failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}\n"
            f"autoscaler log:\n{outcome['monitor_log'][-5000:]}"
        )
        outcome["report"] = json.loads(lines[-1][len("REPORT ") :])
        marker = str(cluster.temp_dir)
        cluster.shutdown()
        outcome["leftover_pids"] = _pids_with(marker)
        outcome["total_seconds"] = time.monotonic() - t_start
        r = outcome["report"]
        print(
            f"\n[cluster autoscaling] head {outcome['head_seconds']:.1f}s, train node {r['train_seconds']:.1f}s, "
            f"eval+data nodes {r['eval_data_seconds']:.1f}s, scale-down {r['scale_down_seconds']:.1f}s, "
            f"total {outcome['total_seconds']:.1f}s"
        )
        yield outcome
    finally:
        cluster.shutdown()  # idempotent; the guaranteed teardown when anything above failed


def _pids_with(marker: str) -> list[int]:
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in a for a in p.info["cmdline"] or ()):
                found.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _launches(monitor_log: str, node_type: str) -> int:
    return len(re.findall(rf"Launching \d+ nodes?, type {re.escape(node_type)}\b", monitor_log))


def test_derived_config_keeps_the_cloud_node_types_and_their_resources(session):
    types = session["derived"]["available_node_types"]
    assert set(types) == {"ray.head.default", "gpu_train", "gpu_eval", "cpu_data"}
    assert types["gpu_train"]["resources"]["GPU"] == 8 and types["gpu_train"]["resources"]["twinflow_train"] == 8
    assert types["gpu_eval"]["resources"]["GPU"] == 1 and types["gpu_eval"]["resources"]["twinflow_eval"] == 1
    assert types["cpu_data"]["resources"]["twinflow_data"] == 64 and "GPU" not in types["cpu_data"]["resources"]
    assert all(t["min_workers"] == 0 for t in types.values())
    assert session["derived"]["idle_timeout_minutes"] == IDLE_TIMEOUT_MINUTES


def test_cluster_starts_with_the_head_alone(session):
    before = session["report"]["before"]
    assert len(before) == 1
    (head,) = before.values()
    assert not any(k.startswith("twinflow_") for k in head) and "GPU" not in head


def test_training_demand_scales_a_training_node_up_from_zero(session):
    report = session["report"]
    (train_node,) = set(report["train_nodes"])  # both workers fit on one 8-GPU node
    res = report["alive_after_train"][train_node]
    assert res["twinflow_train"] == 8 and res["GPU"] == 8
    assert len(report["alive_after_train"]) == 2, "head + one training node"
    # The autoscaler's own record (>= 1: a fake node that fails to start under load is retried).
    assert _launches(session["monitor_log"], "gpu_train") >= 1


def test_eval_and_data_work_get_their_own_node_types_not_the_free_training_gpus(session):
    report = session["report"]
    (train_node,) = set(report["train_nodes"])
    alive = report["alive_at_eval"]
    assert train_node in alive, "the training node (6 free GPUs) was up when eval work arrived"
    eval_node = report["eval_node"]
    assert eval_node != train_node
    assert alive[eval_node].get("twinflow_eval") == 1 and "twinflow_train" not in alive[eval_node]
    (data_node,) = set(report["data_nodes"])
    assert data_node not in (train_node, eval_node) and alive[data_node]["twinflow_data"] == 64
    assert len(alive) == 4, "head, training, eval and data node; eval/data demand added no training node"
    assert sum("twinflow_train" in r for r in alive.values()) == 1
    log = session["monitor_log"]
    assert _launches(log, "gpu_eval") >= 1 and _launches(log, "cpu_data") >= 1


def test_idle_worker_nodes_are_removed_after_the_idle_timeout(session):
    report = session["report"]
    assert len(report["after"]) == 1, f"worker nodes still alive {report['scale_down_seconds']:.0f}s after release"
    log = session["monitor_log"]
    for node_type in ("gpu_train", "gpu_eval", "cpu_data"):
        assert re.search(rf"Removing 1 nodes of type {node_type} \(idle\)", log), f"{node_type} was not removed as idle"


def test_teardown_ends_every_process_the_cluster_started(session):
    assert session["leftover_pids"] == []


if __name__ == "__main__" and sys.argv[1:] == ["--driver"]:
    _driver()
