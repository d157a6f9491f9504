"""Throughput of the evaluation pool: scored items/s with 1 and 2 actors on the tiny models.

    python jobs/bench_evals.py --data-root /work/shared/benchmarks            # CPU, ~3-5 min on 2 cores
    python jobs/bench_evals.py --prompts 48 --actors 1,2,4 --device cuda      # a GPU box (twinflow_eval not needed)
    ray job submit --working-dir . -- python jobs/bench_evals.py --device cuda

What it does: builds the tiny random-weight models (Qwen-Image, Mask2Former, CLIP, BLIP), renders
the first N GenEval and DPG-Bench prompts once, then times each scorer stage with each actor count
from a clean record file. DPG questions come from a synthetic CSV in the official schema (8
questions per prompt), since the real CSV is not shipped. Prints one JSON object per measurement
and, last, one JSON object with all of them. ``items`` are prompts (GenEval: images_per_prompt
images each; DPG: one 2x2 grid, 4 tiles x 8 questions). ``items_per_s`` counts from the stage's
start (actor start-up included); ``steady_items_per_s`` from its first finished shard.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform as host
import sys
import tempfile
import time
from pathlib import Path

import _code_path  # noqa: E402,F401 - the submitted checkout first on sys.path (jobs/_code_path.py)

from evals.config import DPGConfig, EvalConfig, GenEvalConfig, GenerationConfig, PoolConfig, StageConfig  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="", help="official benchmarks folder; default: a built-in mini set")
    p.add_argument("--prompts", type=int, default=24, help="prompts per benchmark")
    p.add_argument("--actors", default="1,2", help="comma list of actor counts to time")
    p.add_argument("--benchmarks", default="geneval,dpg")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shard-size", type=int, default=2)
    p.add_argument("--work-dir", default="", help="where models and images go (default: a temp dir)")
    return p.parse_args(argv)


def synthetic_dpg_csv(items, path: Path, per_item: int = 8) -> None:
    cats = ["entity - whole", "attribute - color", "relation - spatial", "other - count", "global -",
            "entity - part", "attribute - texture", "relation - non-spatial"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "text", "keywords", "proposition_id", "dependency", "category_broad",
                    "category_detailed", "tuple", "question_natural_language"])
        for it in items:
            for q in range(1, per_item + 1):
                cat = cats[(q - 1) % len(cats)]
                w.writerow([it.key, it.prompt, "", q, "0" if q == 1 else "1", cat.split("-")[0].strip(), cat,
                            f"{cat} (thing{q})", f"Is there thing number {q} in the image?"])


def build(args, work: Path):
    from evals.mini_data import COCO80_GENEVAL, write_mini_benchmarks
    from evals.prompts import load_dpg, resolve_data_root
    from evals.tiny_models import build_all
    from twinflow.models.tiny_qwen import build_tiny_qwen_image

    data = resolve_data_root(args.data_root) if args.data_root else write_mini_benchmarks(work / "benchmarks")
    models = build_all(work, COCO80_GENEVAL, bias_class="bench", with_qwen_vl=False)
    ckpt = build_tiny_qwen_image(work / "qwen-image", "tiny", overwrite=False)
    csv_path = work / "dpg_questions.csv"
    synthetic_dpg_csv(load_dpg(data, args.prompts), csv_path)
    stage = StageConfig(num_actors=1, num_cpus=1.0, num_gpus=1.0 if args.device == "cuda" else 0.0,
                        shard_size=args.shard_size, batch_size=8)
    cfg = EvalConfig(checkpoint=str(ckpt), output_dir=str(work / "eval"), data_root=str(data),
                     benchmarks=args.benchmarks.split(","), nfe=[1], limit=args.prompts,
                     generation=GenerationConfig(max_sequence_length=16),
                     geneval=GenEvalConfig(images_per_prompt=4, resolution=64, detector=str(models["mask2former"]),
                                           clip=str(models["clip"]), detector_short_edge=64, detector_long_edge=107),
                     dpg=DPGConfig(questions_csv=str(csv_path), questions_blob="", tile_resolution=32,
                                   vqa_model=str(models["blip"])),
                     pool=PoolConfig(device=args.device, eval_resource="", generate=stage, geneval=stage, dpg=stage))
    cfg.validate()
    return cfg


def main(argv=None) -> int:
    args = parse(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join(sys.path[:2] + [os.environ.get("PYTHONPATH", "")])
    import ray

    from evals import runner
    from twinflow.ray_env import connect

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-evals-"))
    cfg = build(args, work)
    connect(log_to_driver=False)  # a fresh local Ray unless RAY_ADDRESS names one
    data_root = Path(cfg.data_root)
    out = Path(cfg.output_dir)
    plans = [runner.plan_benchmark(b, cfg, data_root, out) for b in cfg.benchmarks]
    folder = Path(cfg.checkpoint)
    for p in plans:
        runner._check_settings(cfg, p, runner._generation_settings(cfg, p, folder))
    t0 = time.time()
    gen_stats, _ = runner.run_generation(cfg, plans, folder, cfg.pool.device, runner.Hooks())
    images = sum(len(p.items) * p.n_images for p in plans)
    results = [{"stage": "generate", "actors": 1, "items": gen_stats["tasks"], "wall_s": round(time.time() - t0, 2),
                "images_per_s": round(images / max(1e-9, time.time() - t0), 2)}]
    print(json.dumps(results[-1]), flush=True)
    for plan in plans:
        for n in [int(a) for a in args.actors.split(",")]:
            getattr(cfg.pool, plan.name).num_actors = n
            plan.records.reset()
            marks: list[float] = []
            hooks = runner.Hooks(on_shard=lambda stage, pool, shard, recs: marks.append(time.time()))
            t = time.time()
            stats = runner.run_scoring(cfg, plan, cfg.pool.device, set(), hooks)
            wall = time.time() - t
            scored = sum(r["status"] == "scored" for r in plan.records.read())
            steady = ((stats["tasks"] - args.shard_size) / (marks[-1] - marks[0])) if len(marks) > 1 else None
            row = {"stage": plan.name, "actors": n, "items": stats["tasks"], "scored": scored,
                   "wall_s": round(wall, 2), "items_per_s": round(stats["tasks"] / wall, 3),
                   "steady_items_per_s": round(steady, 3) if steady else None,
                   "actor_deaths": stats["actor_deaths"]}
            results.append(row)
            print(json.dumps(row), flush=True)
    summary = {"benchmark": "evals_pool_throughput", "device": args.device, "host_cpus": os.cpu_count(),
               "ray_cpus": ray.cluster_resources().get("CPU"), "ray_gpus": ray.cluster_resources().get("GPU", 0),
               "python": host.python_version(), "prompts": args.prompts, "shard_size": args.shard_size,
               "data": "official" if args.data_root else "mini", "results": results}
    ray.shutdown()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
