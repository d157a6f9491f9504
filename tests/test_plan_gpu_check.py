"""jobs/gpu_check.py without a GPU: the dry path (meta build, parameter counts, the plan) and the
whole GPU code path run on the CPU with the tiny architecture (--smoke-cpu), so the script the
lent GPU runs has executed end to end before it gets there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict, dict]:
    out_file = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "gpu_check.py"), *args, "--out", str(out_file)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    return proc, last, json.loads(out_file.read_text())


def test_dry_run_plans_and_counts_the_real_model(tmp_path):
    proc, report, saved = run("--dry-run", tmp_path=tmp_path)
    assert report == saved and report["status"] == "dry-run"
    assert "optimizer moments" in proc.stdout            # the plan's table comes first
    meta = report["meta_check"]
    assert meta["counts_agree"] and meta["base_params"] == 20_440_630_848
    assert meta["peft_lora_params"] == 425_279_488
    plan = report["plan"]["twinflow"]
    assert plan["fits"] and 40 < plan["gpu_total_gib"] < 60
    assert plan["tokens"] == {"image": 1024, "text": 64}


def test_gpu_path_smoke_on_cpu(tmp_path):
    _, report, _ = run("--smoke-cpu", "--steps", "1", "--fm-steps", "1", tmp_path=tmp_path)
    assert report["status"] == "ok"
    assert report["twinflow"]["forwards"]["grad_forwards"] == 1.0
    summary = report["summary"]
    assert {"memory_ratio", "time_ratio", "planned_over_measured", "twinflow_step_s"} <= set(summary)
    assert 0.85 <= summary["planned_over_measured"] <= 1.15


def test_shell_wrapper_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "jobs" / "gpu_check.sh")]).returncode == 0
    usage = subprocess.run(["bash", str(ROOT / "jobs" / "gpu_check.sh"), "nonsense"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
