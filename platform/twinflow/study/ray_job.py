"""Ray Train wiring of the study: one TorchTrainer run per (dataset, method).

Workers are CPU processes joined by a gloo process group (Ray's TorchBackend); each holds a DDP
replica and draws its own micro-batch, and blocks are dealt over the global batch. Rank 0 shows a
progress bar on the driver (tqdm_ray); every rank calls ``ray.train.report`` the same number of
times, and the final report carries rank 0's checkpoint (model + sampling EMA).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from twinflow.config.tree import from_dict, to_dict
from twinflow.method import TwinFlowConfig
from twinflow.study.datasets import Digits, Mixture2D, load_digits, make_mixture
from twinflow.study.trainer import TrainResult, TrainSettings, build_net, train_run

CHECKPOINT_FILE = "weights.pt"


def load_dataset(name: str, mixture_modes: int = 8, mixture_seed: int = 0) -> Digits | Mixture2D:
    if name == "digits":
        return load_digits()
    if name == "mixture2d":
        return make_mixture(mixture_modes, mixture_seed)
    raise ValueError(f"unknown dataset {name!r}; choose digits or mixture2d")


def worker_loop(config: dict) -> None:
    """Per-worker entry point: trains every run of ``config["runs"]`` in turn.

    One worker group serves the whole study (starting one costs ~15 s on 2 cores). After each
    run every rank reports; rank 0 attaches that run's checkpoint (kept: num_to_keep=None).
    ``config["probe"]`` (optional, picklable): ``build(dataset)`` returns a callable that scores the
    sampling network at each log step on rank 0 (the Tune sweep's 1-NFE quality, twinflow/tune/probes.py).
    """
    import time

    import ray.train
    import torch.distributed as dist
    from ray.experimental.tqdm_ray import tqdm
    from torch.nn.parallel import DistributedDataParallel

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(config.get("threads_per_worker", 1)))

    def wrap(model):
        return DistributedDataParallel(model) if world > 1 else model

    def reduce_stats(stats: dict) -> dict:
        if world == 1:
            return stats
        names = sorted(stats)
        flat = torch.stack([torch.stack([stats[k][0].float(), stats[k][1].float()]) for k in names])
        dist.all_reduce(flat)
        return {k: (flat[i, 0], flat[i, 1]) for i, k in enumerate(names)}

    probe_factory = config.get("probe")  # optional: an object with build(dataset) -> probe (study/trainer.py)
    for index, run in enumerate(config["runs"]):
        data = load_dataset(run["dataset"], config["mixture_modes"], config["mixture_seed"])
        # Metrics reach Ray from rank 0 only, so only rank 0 pays for the probe.
        probe = probe_factory.build(data) if (probe_factory is not None and rank == 0) else None
        method = from_dict(TwinFlowConfig, run["method"])
        settings = from_dict(TrainSettings, run["train"])
        label = f"{run['dataset']}/{run['method_name']}"
        bar = tqdm(total=settings.steps, desc=label) if rank == 0 else None

        def report(step: int, row: dict) -> None:
            if bar is not None:
                bar.update(step - bar.n)
                bar.set_description(f"{label} loss {row.get('loss/total', float('nan')):.4f}")
            ray.train.report({"run": index, "step": step, **row})

        t0 = time.time()
        result = train_run(data, method, settings, rank=rank, world_size=world, wrap=wrap, report=report,
                           reduce_stats=reduce_stats, probe=probe)
        if bar is not None:
            bar.close()
        final = {"run": index, "run_done": 1.0, "train_s": time.time() - t0, **result.history[-1]}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                torch.save(_state(result), os.path.join(tmp, CHECKPOINT_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(final, checkpoint=checkpoint)


def _state(result: TrainResult) -> dict:
    return {"model": result.model.state_dict(),
            "ema": result.ema.module.state_dict() if result.ema is not None else None,
            "history": result.history}


@dataclass
class TrainedRun:
    net: torch.nn.Module
    history: list[dict]
    train_s: float


def fit_runs(runs: list[dict], workers: int, storage: Path, name: str, mixture_modes: int,
             mixture_seed: int) -> list[TrainedRun]:
    """Train ``runs`` ({dataset, method_name, method: TwinFlowConfig, train: TrainSettings}) in one
    Ray Train job; return each run's sampling network (EMA weights when kept) in order."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    threads = max(1, (os.cpu_count() or 1) // workers)
    config = {"runs": [{"dataset": r["dataset"], "method_name": r["method_name"], "method": to_dict(r["method"]),
                        "train": to_dict(r["train"])} for r in runs],
              "mixture_modes": mixture_modes, "mixture_seed": mixture_seed, "threads_per_worker": threads}
    trainer = TorchTrainer(
        worker_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo", timeout_s=600),
        run_config=RunConfig(name=name, storage_path=str(storage.resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=None)))
    result = trainer.fit()
    by_run = {int(m["run"]): (ckpt, m) for ckpt, m in result.best_checkpoints}
    missing = [f"{r['dataset']}/{r['method_name']}" for i, r in enumerate(runs) if i not in by_run]
    if missing:
        raise RuntimeError(f"Ray Train finished without checkpoints for: {', '.join(missing)}")
    trained = []
    for i, r in enumerate(runs):
        checkpoint, metrics = by_run[i]
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        net = build_net(load_dataset(r["dataset"], mixture_modes, mixture_seed), r["train"].net)
        net.load_state_dict(state["ema"] if state["ema"] is not None else state["model"])
        trained.append(TrainedRun(net.eval(), state["history"], float(metrics["train_s"])))
    return trained
