"""A frozen teacher under a real DeepSpeed ZeRO-2 engine (LoRA and full-parameter): it starts equal to
the online network, keeps the starting weights while the engine's optimizer steps move the online ones,
so after training the two differ. ZeRO-3 refuses frozen/EMA teachers in the config (test_train_config)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.deepspeed]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_frozen_teacher_keeps_the_starting_weights_under_deepspeed(tiny_qwen_image, mode):
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "frozen_teacher_check.py"), str(tiny_qwen_image), mode],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "DS_BUILD_OPS": "0"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["teacher"] == ("LoraFrozenTeacher" if mode == "lora" else "FrozenTeacher")
    assert got["start_gap"] < 1e-6  # the teacher is the starting network ...
    assert got["online_moved"] > 1e-3  # ... the engine's steps moved the online one ...
    assert got["teacher_moved"] == 0.0  # ... and not the teacher
    assert got["teacher_vs_online_after"] > 1e-3
