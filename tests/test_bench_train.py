"""jobs/bench_train.py runs end to end (tiny preset, few repetitions) and its last line is the JSON
report with the ratios and forward counts. The speed/memory targets themselves are reported by the
benchmark, never asserted here (timings on a shared CPU are not a test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_tiny_prints_json_last():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "bench_train.py"), "--tiny", "--reps", "2",
                          "--mem-reps", "1"], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("memory_ratio", "time_ratio", "forward_counts", "twinflow", "fm", "planned_memory_ratio"):
        assert key in data
    assert data["memory_ratio"] > 0 and data["time_ratio"] > 0
    counts = data["forward_counts"]
    assert counts["expected_per_b"]["enhancement_on"]["grad_forwards"] == 1.0
    assert abs(counts["expected_per_b"]["enhancement_on"]["nograd_forwards"] - 3.1148) < 0.01
    assert abs(counts["expected_per_b"]["enhancement_off"]["nograd_forwards"] - 1.7814) < 0.01
    measured = counts["measured_this_batch"]
    assert measured["fm"] == {"grad_forwards": 1.0, "nograd_forwards": 0.0}
    assert measured["twinflow"]["grad_forwards"] == 1.0
    # B = 6 as 1/2/2/1 rows: fake 1 + CFG 2×4 + rollouts 2×(1..5) + rectification 2×1 rows.
    assert 13 / 6 - 1e-9 <= measured["twinflow"]["nograd_forwards"] <= 21 / 6 + 1e-9
    # Without CFG enhancement: fake 1 + rollouts 2×(1..5) + rectification 2×1 rows.
    assert 5 / 6 - 1e-9 <= measured["twinflow_enhancement_off"]["nograd_forwards"] <= 13 / 6 + 1e-9
