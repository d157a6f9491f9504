"""train/plan.py: what ``jobs/train_qwen.py --dry-run`` prints about memory — the planner's table and
verdicts for the 20B configs, and a plan for the tiny CPU model (no weights, no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def test_train_dry_run_prints_the_memory_plan_for_the_20b_configs():
    job = [sys.executable, str(ROOT / "jobs" / "train_qwen.py"), "--dry-run", "--config"]
    procs = {name: subprocess.Popen(job + [str(ROOT / "jobs" / "configs" / f"{name}.yaml")], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name in ("qwen_image_lora", "qwen_image_full_zero3")}
    outputs = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outputs[name] = out
    lora, full = outputs["qwen_image_lora"], outputs["qwen_image_full_zero3"]
    for text in (lora, full):
        assert "memory plan (per GPU):" in text and "= GPU total" in text and "parameters: 20,440,630,848" in text
        assert any(line.startswith("h100: ") for line in text.splitlines())
        assert any(line.startswith("h200: ") for line in text.splitlines())
    assert "lora r64 | bfloat16 | ZeRO-2 | 8 GPU(s) | micro-batch 4 × accum 1 | 512×512" in lora
    assert "full | bfloat16 | ZeRO-3 | 16 GPU(s) | micro-batch 2 × accum 1 | 512×512" in full
    plan = json.loads(full[full.index('{\n  "deepspeed_config"'):])["memory_plan"]
    assert plan["fits_gpus"] == {"h100": plan["fits"], "h200": True} and plan["tokens"]["image"] == 1024


def test_tiny_cpu_dry_run_plans_the_tiny_model():
    from twinflow.train.plan import dry_run_report
    from twinflow.train.presets import tiny

    cfg = tiny()
    report = dry_run_report(cfg)
    plan = report["memory_plan"]
    assert "error" not in plan and plan["params"]["total"] < 10_000_000
    assert plan["workers_use_gpu"] is False and plan["tokens"]["image"] == (64 // 16) ** 2
    table = report["memory_table"]
    assert "ZeRO-2 | 2 GPU(s) | micro-batch 3 × accum 2" in table and "the GPU verdicts do not apply" in table
