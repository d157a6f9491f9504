"""Benchmark: flow-matching pretraining of the digits base through jobs/train_qwen.py vs a plain loop.

The same model (the base's QwenImageTransformer2DModel as TwinFlow loads it), the same latent cache
and the same global batch, in one run, measured side by side:

  plain      one process, a plain PyTorch loop: the cache in memory, x_t = t·z + (1 − t)·x, MSE on
             z − x, AdamW; ``--threads`` torch threads (default 2: the machine's cores)
  platform   ``run_training`` of the base's pretraining config (twinflow/mini/base.py): Ray Train +
             DeepSpeed, the latent cache through Ray Data, for each ``--variants`` entry
             ``<workers>x<threads>:zero<stage>`` (e.g. 2x1:zero2 = 2 workers of 1 thread, ZeRO-2)
Throughput is samples per second in steady state: for the platform from the wall-clock stamps of its
metric rows (everything between two rows counts: data, logging, collectives), skipping the first
``--warmup`` steps. The last stdout line is JSON with each variant's samples/s and its ratio to plain.

    python jobs/bench_pretrain.py                       # the default base (built first if missing)
    python jobs/bench_pretrain.py --recipe small --steps 300 --variants 2x1:zero2,1x2:zero2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _code_path  # noqa: E402,F401 - the submitted checkout first on sys.path (jobs/_code_path.py)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="default")
    p.add_argument("--steps", type=int, default=400, help="steps per measurement")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--threads", type=int, default=2, help="plain loop's torch threads")
    p.add_argument("--variants", default="1x2:zero2,2x1:zero2")
    return p.parse_args(argv)


def plain_loop(root: Path, batch: int, steps: int, warmup: int, threads: int, lr: float) -> float:
    import torch

    from twinflow.data.cache import read_cache_table, table_to_batch
    from twinflow.data.loader import BatchSpec, to_training_batch
    from twinflow.models.loading import load_twinflow_transformer
    from twinflow.models.qwen_velocity import QwenImageVelocity

    torch.set_num_threads(threads)
    table, _ = read_cache_table(str(root / "cache"))
    rows = table_to_batch(table)
    data = to_training_batch(rows, BatchSpec(kind="cache", batch_size=len(rows["key"])))
    vel = QwenImageVelocity(load_twinflow_transformer(str(root / "init"), torch_dtype=torch.float32)).train()
    opt = torch.optim.AdamW(vel.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    n = data["latents"].shape[0]
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        idx = torch.randint(0, n, (batch,), generator=gen)
        x = data["latents"][idx]
        length = int(data["prompt_mask"][idx].sum(1).max())
        cond = {"prompt_embeds": data["prompt_embeds"][idx, :length], "prompt_mask": data["prompt_mask"][idx, :length]}
        t = torch.rand(batch, generator=gen)
        z = torch.randn(x.shape, generator=gen)
        tt = t.view(-1, 1, 1, 1)
        loss = ((vel(tt * z + (1 - tt) * x, t, t, cond) - (z - x)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def platform_run(root: Path, recipe, variant: str, steps: int, warmup: int) -> dict:
    from twinflow.mini.base import pretrain_config
    from twinflow.train.trainer import run_training

    shape, stage = variant.split(":")
    workers, threads = (int(v) for v in shape.split("x"))
    runs = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    cfg = pretrain_config(recipe, root / "init", root / "cache", runs)
    global_batch = recipe.pretrain.global_batch
    cfg = dataclasses.replace(
        cfg, deepspeed=dataclasses.replace(cfg.deepspeed, zero_stage=int(stage.removeprefix("zero")),
                                           micro_batch_per_gpu=global_batch // workers),
        scaling=dataclasses.replace(cfg.scaling, num_workers=workers, threads_per_worker=threads,
                                    resources_per_worker={"CPU": min(1.0, 2.0 / workers) * 0.5 * threads}),
        run=dataclasses.replace(cfg.run, name=f"bench-{workers}x{threads}-{stage}", max_steps=warmup + steps,
                                checkpoint_every=warmup + steps, log_every=1),
        sample=dataclasses.replace(cfg.sample, enabled=False),
        logging=dataclasses.replace(cfg.logging, tensorboard=False, progress_bar=False))
    try:
        outcome = run_training(cfg)
        rows = [json.loads(line) for line in (Path(outcome.summary["final"]) / "metrics.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    rows = [r for r in rows if r["step"] > warmup]
    first, last = rows[0], rows[-1]
    rate = (last["samples_seen"] - first["samples_seen"]) / (last["wall_time"] - first["wall_time"])
    return {"variant": variant, "samples_per_s": rate, "median_step_time_s": sorted(r["step_time_s"] for r in rows)[len(rows) // 2],
            "median_data_wait_s": sorted(r["data_wait_s"] for r in rows)[len(rows) // 2], "run_seconds": outcome.seconds}


def main(argv=None) -> int:
    args = parse(argv)
    from twinflow.mini.base import build_base
    from twinflow.mini.recipe import RECIPES
    from twinflow.ray_env import connect

    recipe = RECIPES[args.recipe]()
    root = build_base(recipe)
    # The plain loop runs before Ray starts: no Ray processes beside it, as a user's own loop would run.
    plain = plain_loop(root, recipe.pretrain.global_batch, args.steps, args.warmup, args.threads, recipe.pretrain.lr)
    connect()
    print(json.dumps({"plain_samples_per_s": plain}), flush=True)
    results = []
    for v in args.variants.split(","):
        r = platform_run(root, recipe, v, args.steps, args.warmup)
        r["ratio_to_plain"] = r["samples_per_s"] / plain
        results.append(r)
        print(json.dumps(r), flush=True)
    print(json.dumps({"batch": recipe.pretrain.global_batch, "plain": {"threads": args.threads, "samples_per_s": plain},
                      "platform": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
