"""Run by tests/test_train_teachers.py in a fresh process (one rank, gloo): a frozen teacher under a
real DeepSpeed ZeRO-2 engine keeps the starting weights while the engine trains the online ones.

    python tests/frozen_teacher_check.py <tiny model folder> <lora|full>   -> one JSON line
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT / "tests")]


def main(model: str, mode: str) -> dict:
    import deepspeed
    import torch

    from train_support import tiny_config
    from twinflow.models.lora import make_qwen_teacher
    from twinflow.train.ds_config import deepspeed_config
    from twinflow.train.engine import build_engine

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = tiny_config(model, "unused", "/tmp", "frozen", twinflow={"teacher": "frozen"},
                      scaling={"num_workers": 1}, deepspeed={"gradient_accumulation": 1},
                      optim={"lr": 1e-2, "warmup_steps": 0, "schedule": "constant"})
    if mode == "full":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mode="full", ema=False, dtype="bfloat16"))
    else:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ema=False))
    engine, velocity = build_engine(cfg, model, deepspeed_config(cfg))
    teacher = make_qwen_teacher("frozen", velocity)
    conf = velocity.transformer.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, conf.out_channels, 8, 8, generator=gen)
    cond = {"prompt_embeds": torch.randn(2, 5, conf.joint_attention_dim, generator=gen)}
    t, r = torch.tensor([0.7, -0.4]), torch.tensor([0.2, -0.9])
    with torch.no_grad():
        online_before = velocity(x, t, r, cond).float()
        teacher_before = teacher.velocity(x, t, r, cond).float()
    for _ in range(3):
        loss = (engine(x, t, r, cond).float() - 1.0).pow(2).mean()
        engine.backward(loss)
        engine.step()
    with torch.no_grad():
        online_after = velocity(x, t, r, cond).float()
        teacher_after = teacher.velocity(x, t, r, cond).float()
    return {"mode": mode, "teacher": type(teacher).__name__,
            "start_gap": float((teacher_before - online_before).abs().max()),
            "online_moved": float((online_after - online_before).abs().max()),
            "teacher_moved": float((teacher_after - teacher_before).abs().max()),
            "teacher_vs_online_after": float((teacher_after - online_after).abs().max())}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
