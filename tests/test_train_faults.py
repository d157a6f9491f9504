"""Fault tolerance of the training job: worker processes die (``os._exit``, as a preempted node or an
OOM kill looks to Ray Train) mid-run and while a checkpoint is being written; Ray Train restarts the
worker group from the last *registered* checkpoint, and the run ends with every step trained exactly
once and the same trajectory as the uninterrupted reference run.
"""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from train_support import LOSS_KEYS, digits_dir, losses_by_step, read_s3_text, reference_run, tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.s3]


def test_worker_deaths_restart_from_the_last_good_checkpoint(ray_local, tiny_qwen_image, tmp_path_factory, s3_server,
                                                            tmp_path):
    from twinflow.train.trainer import run_training

    bucket = s3_server.create_bucket("twinflow-train")
    root = tmp_path_factory.getbasetemp()
    _, ref, _ = reference_run(tiny_qwen_image, root, s3_server, bucket)
    ref_rows = [json.loads(x) for x in read_s3_text(s3_server, f"{ref.run_uri}/final/metrics.jsonl").splitlines()]

    markers = tmp_path / "faults"
    # Rank 1 dies after writing its shard of checkpoint 4 (before reporting it), and later right
    # after finishing step 5. Checkpoints every 2 steps: restarts must resume from 2, then from 4.
    cfg = tiny_config(tiny_qwen_image, digits_dir(root), f"{bucket}/runs", "faults", sample={"enabled": False},
                      run={"max_failures": 2},
                      debug={"exit_in_checkpoint_at_step": 4, "exit_at_step": 5, "exit_rank": 1,
                             "fault_marker_dir": str(markers)})
    outcome = run_training(cfg, storage_filesystem=s3_server.filesystem())

    assert sorted(p.name for p in markers.iterdir()) == ["exit_at_step_5", "exit_in_checkpoint_4"]  # both fired
    s = outcome.summary
    assert (s["step"], s["stop_reason"], s["skipped_steps"]) == (6, "done", 0)
    assert s["resumed_from"] == [2, 4]  # the half-written checkpoint 4 was never used

    rows = [json.loads(x) for x in read_s3_text(s3_server, f"{outcome.run_uri}/final/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # none missing, none twice
    got, want = losses_by_step(rows), losses_by_step(ref_rows)
    for step in range(1, 7):
        for key in LOSS_KEYS:
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-9), (step, key)

    # Registered checkpoints are whole: both ranks' shards and completion markers.
    assert sorted(int(c.path.rsplit("_", 1)[1]) for c, _ in outcome.result.best_checkpoints) == [2, 4, 6]
    fs = s3_server.filesystem()
    for c, _ in outcome.result.best_checkpoints:
        names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(c.path, recursive=True))}
        assert {"complete_rank_00000", "complete_rank_00001", "rank_00000.json", "rank_00001.json",
                "rank_00000.safetensors", "rank_00001.safetensors", "shared.json"} <= names
        assert not any(n.endswith(".pt") for n in names if "zero_pp" not in n and "model_states" not in n), names


def test_the_post_checkpoint_wait_lasts_until_the_controller_took_the_report(ray_local, tmp_path):
    """``wait_for_commit`` after ``ray.train.report``: the report is still queued when it starts and taken
    by the controller (Ray's ~2 s poll) when it returns, so a worker killed afterwards cannot lose it."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def _report_then_wait(config: dict) -> None:  # defined here: cloudpickle ships it by value
        import tempfile
        import time
        from pathlib import Path

        import ray.train
        from ray.train.v2._internal.execution.context import get_train_context

        from twinflow.train.loop import wait_for_commit

        queue = get_train_context().execution_context.result_queue
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "state.txt").write_text("step 1")
            ray.train.report({"step": 1}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            pending = queue.unfinished_tasks  # the report is queued, not yet taken by the controller
            t0 = time.monotonic()
            wait_for_commit(timeout_s=60)
            waited, left = time.monotonic() - t0, queue.unfinished_tasks
        Path(config["out"]).write_text(f"{pending} {waited} {left}")

    out = tmp_path / "waited.txt"
    result = TorchTrainer(_report_then_wait, train_loop_config={"out": str(out)},
                          scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                          torch_config=TorchConfig(backend="gloo"),
                          run_config=RunConfig(name="commit-wait", storage_path=str(tmp_path / "runs"))).fit()
    pending, waited, left = out.read_text().split()
    assert int(pending) == 1 and int(left) == 0
    assert float(waited) > 0.05  # it did wait for the poll (not a no-op on a Ray without the internal queue)
    assert result.checkpoint is not None  # and the checkpoint it waited for is the run's
