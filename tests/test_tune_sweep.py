"""tune/sweep.py + trials.py: real sweeps through Ray Tune + Ray Train on local Ray (digits target).

  * a 3-trial sweep where ASHA must stop a trial whose learning rate cannot learn (a constructed
    case: 1e-7), with the table, plot and a best config that jobs/train_qwen.py accepts;
  * the driver killed after one trial finished; re-running the same command restores the sweep,
    keeps the finished trial and runs the rest.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twinflow.tune.config import PRESETS, build_sweep

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.ray


def _short_digits(storage: Path, name: str, steps: int) -> list[str]:
    return [f"storage_path={storage}", f"name={name}", f"digits.train.steps={steps}", "digits.train.warmup_steps=20",
            "digits.probe.samples_per_class=20", "tune.num_samples=1", "tune.max_concurrent_trials=1"]


def test_asha_stops_the_trial_that_cannot_learn_and_the_winner_runs(ray_local, tmp_path):
    from twinflow.tune.results import COMPLETED, STOPPED
    from twinflow.tune.sweep import run_sweep

    # One trial at a time, so the rung comparison is deterministic: trial 1 (lr 2e-3) sets rung 100's
    # bar, trial 2 (lr 1e-7: the network barely moves from its init) falls below it and is stopped.
    cfg = build_sweep(PRESETS["digits"](), overrides=_short_digits(tmp_path, "asha", 300) + ["asha.grace_period=100"],
                      searches=["lam=grid:0.3333", "lr=grid:2e-3,1e-7,1e-3"])
    outcome = run_sweep(cfg)
    rows = {r["lr"]: r for r in outcome.rows}
    assert len(outcome.rows) == 3 and not outcome.restored and outcome.max_concurrent_trials == 1
    assert rows[2e-3]["status"] == COMPLETED and rows[2e-3]["step"] == 300 and rows[2e-3]["reports"] == 4  # 3 log steps + the run's end
    assert rows[1e-7]["status"] == STOPPED and rows[1e-7]["step"] == 100 and rows[1e-7]["reports"] == 1
    assert rows[1e-7]["frechet_1nfe"] > 2 * rows[2e-3]["frechet_1nfe"]
    assert rows[2e-3]["recall_1nfe"] > 0.3
    assert outcome.winner is not None and outcome.winner["lr"] != 1e-7 and outcome.winner["status"] == COMPLETED

    results = tmp_path / "asha" / "results"
    with open(results / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert sorted(float(r["lr"]) for r in table) == [1e-7, 1e-3, 2e-3]
    assert {r["status"] for r in table} >= {COMPLETED, STOPPED}
    assert (results / "metric_vs_lambda.png").stat().st_size > 1000
    assert "**(best)**" in (results / "trials.md").read_text()
    best = results / "best_train_qwen.yaml"
    assert f"lr: {outcome.winner['lr']}" in best.read_text()
    dry = subprocess.run([sys.executable, str(ROOT / "jobs" / "train_qwen.py"), "--config", str(best), "--dry-run"],
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    assert "λ realised" in dry.stdout


def _trial_states(path: Path) -> list[dict]:
    from twinflow.tune.sweep import experiment_trials

    try:
        return experiment_trials(str(path))
    except Exception:  # the driver may be rewriting its state file right now
        return []


def _result_lines(experiment: Path, trial_id: str) -> int:
    files = [p for p in experiment.glob(f"*{trial_id}*/result.json")]
    assert len(files) == 1, files
    return len(files[0].read_text().splitlines())


def test_a_killed_driver_resumes_the_sweep_without_rerunning_finished_trials(tmp_path):
    sets = _short_digits(tmp_path, "resume", 200) + ["asha.enabled=false"]
    cmd = [sys.executable, str(ROOT / "jobs" / "tune_lambda.py"), "--search", "lam=grid:0.1667,0.3333",
           "--search", "lr=grid:1e-3"] + [a for s in sets for a in ("--set", s)]
    # Its own local Ray (RAY_ADDRESS=local), in its own process group, so the kill takes the whole
    # driver side down as a lost head-node driver would.
    env = {**os.environ, "RAY_ADDRESS": "local"}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    experiment = tmp_path / "resume"
    deadline = time.time() + 400
    done: list[dict] = []
    try:
        while time.time() < deadline and first.poll() is None:
            done = [t for t in _trial_states(experiment) if t["status"] == "TERMINATED"]
            if done:
                break
            time.sleep(2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        log.close()
    assert len(done) == 1, (tmp_path / "first.log").read_text()[-3000:]
    finished = done[0]["trial_id"]
    lines_before = _result_lines(experiment, finished)

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["restored"] is True and summary["trials"] == 2
    assert "restoring the sweep" in second.stdout + second.stderr
    states = {t["trial_id"]: t["status"] for t in _trial_states(experiment)}
    assert states[finished] == "TERMINATED" and list(states.values()).count("TERMINATED") == 2
    assert _result_lines(experiment, finished) == lines_before  # not trained again
    with open(experiment / "results" / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert sorted(float(r["lam"]) for r in table) == [0.1667, 0.3333]
    assert all(r["status"] == "completed" and r["step"] == "200" for r in table)
