"""Ray Train wiring of the study: one TorchTrainer job trains every (dataset, method) run.

Workers are CPU processes joined by a gloo process group (Ray's TorchBackend). Two ways to use them
(``StudyConfig.parallel``):

  runs  each worker trains whole runs on its own (no DDP), runs dealt over workers by estimated
        cost; every worker reports once at the end, with a checkpoint holding its runs (Ray merges
        the workers' files into one checkpoint directory). The default: the study's networks are
        so small that a gloo all-reduce per step costs more than it saves (measured on 2 cores,
        digits TwinFlow: 1 worker × 2 threads 13.7 it/s, 2 DDP workers 10.8 it/s; in the full
        study, two runs side by side on one thread each, 12.5 it/s each).
  data  every run is data-parallel over all workers (DDP replicas, each draws its own micro-batch,
        blocks dealt over the global batch); ranks report every log step and rank 0 attaches
        each run's checkpoint. The path the Qwen-Image job takes at scale, and Tune's trials.

Either way a run's weights land in ``run_<index>.pt`` (model, sampling EMA, history, seconds).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from twinflow.config.tree import from_dict, to_dict
from twinflow.method.objectives import method_from_dict
from twinflow.study.datasets import Digits, Mixture2D, load_digits, make_mixture
from twinflow.study.trainer import TrainResult, TrainSettings, build_net, train_run

RUN_FILE = "run_{index:03d}.pt"
PARALLEL_MODES = ("runs", "data")


def run_cost(run: dict) -> float:
    """Relative CPU cost of a run, for dealing runs over workers: steps × a rough per-step weight
    (digits 3× a mixture step, RCGM / TwinFlow 1.6× a flow-matching step). The full study measured
    digits ≈ 6× and RCGM / TwinFlow 1.1–1.6×; the deal it gave was still balanced (1002 s vs 912 s
    of training per worker)."""
    per_step = 3.0 if run["dataset"] == "digits" else 1.0
    steps = float(run["train"]["steps"])
    name = run["method_name"]
    if name in ("dmd2", "vsd"):
        # FM pretraining of the teacher, then distillation: each step ≈ (fake_updates + 2) FM steps.
        distill = run["train"].get("distill_steps") or steps // 4
        return per_step * (steps + distill * (run["method"].get("fake_updates", 1) + 2))
    if name != "fm":
        per_step *= 1.6
    return steps * per_step


def deal_runs(runs: list[dict], workers: int) -> list[list[int]]:
    """Run indices per worker: longest first onto the least-loaded worker (LPT), each worker's list
    in index order. Deterministic, so every rank computes the same deal."""
    load = [0.0] * workers
    deal: list[list[int]] = [[] for _ in range(workers)]
    for i in sorted(range(len(runs)), key=lambda i: (-run_cost(runs[i]), i)):
        w = min(range(workers), key=lambda w: (load[w], w))
        load[w] += run_cost(runs[i])
        deal[w].append(i)
    return [sorted(d) for d in deal]


def load_dataset(name: str, mixture_modes: int = 8, mixture_seed: int = 0) -> Digits | Mixture2D:
    if name == "digits":
        return load_digits()
    if name == "mixture2d":
        return make_mixture(mixture_modes, mixture_seed)
    raise ValueError(f"unknown dataset {name!r}; choose digits or mixture2d")


def worker_loop(config: dict) -> None:
    """Per-worker entry point: trains the runs of ``config["runs"]`` (module docstring: the two
    ``config["parallel"]`` modes). One worker group serves the whole study (starting one costs
    ~15 s on 2 cores).

    ``config["probe"]`` (optional, picklable): ``build(dataset)`` returns a callable that scores the
    sampling network at each log step on rank 0 (the Tune sweep's 1-NFE quality, twinflow/tune/probes.py).
    """
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(config.get("threads_per_worker", 1)))
    if config.get("parallel", "data") == "runs" and world > 1:
        _train_own_runs(config, rank, world)
    else:
        _train_data_parallel(config, rank, world)


def _train_own_runs(config: dict, rank: int, world: int) -> None:
    """parallel=runs: this rank's share of the runs, each trained alone; one report at the end."""
    import ray.train
    from ray.experimental.tqdm_ray import tqdm

    runs = config["runs"]
    mine = deal_runs(runs, world)[rank]
    with tempfile.TemporaryDirectory() as tmp:
        for index in mine:
            run = runs[index]
            data = load_dataset(run["dataset"], config["mixture_modes"], config["mixture_seed"])
            settings = from_dict(TrainSettings, run["train"])
            label = f"{run['dataset']}/{run['method_name']}"
            bar = tqdm(total=settings.steps, desc=f"[worker {rank}] {label}")

            def progress(step: int, row: dict) -> None:
                bar.update(step - bar.n)
                bar.set_description(f"[worker {rank}] {label} loss {row.get('loss/total', float('nan')):.4f}")

            t0 = time.time()
            result = train_run(data, method_from_dict(run["method"]), settings, report=progress)
            bar.close()
            torch.save(_state(result, time.time() - t0), os.path.join(tmp, RUN_FILE.format(index=index)))
        # Every rank reports exactly once (Ray Train's rule), each with its own files.
        ray.train.report({"runs_done": float(len(mine)), "rank": float(rank)},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp) if mine else None)


def _train_data_parallel(config: dict, rank: int, world: int) -> None:
    """parallel=data: every run over all ranks (DDP); reports every log step, a checkpoint per run."""
    import ray.train
    import torch.distributed as dist
    from ray.experimental.tqdm_ray import tqdm
    from torch.nn.parallel import DistributedDataParallel

    def wrap(model):
        return DistributedDataParallel(model) if world > 1 else model

    def reduce_stats(stats: dict) -> dict:
        if world == 1:
            return stats
        names = sorted(stats)
        flat = torch.stack([torch.stack([stats[k][0].float(), stats[k][1].float()]) for k in names])
        dist.all_reduce(flat)
        return {k: (flat[i, 0], flat[i, 1]) for i, k in enumerate(names)}

    probe_factory = config.get("probe")
    for index, run in enumerate(config["runs"]):
        data = load_dataset(run["dataset"], config["mixture_modes"], config["mixture_seed"])
        # Metrics reach Ray from rank 0 only, so only rank 0 pays for the probe.
        probe = probe_factory.build(data) if (probe_factory is not None and rank == 0) else None
        method = method_from_dict(run["method"])
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
        seconds = time.time() - t0
        final = {"run": index, "run_done": 1.0, "train_s": seconds, **result.history[-1]}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                torch.save(_state(result, seconds), os.path.join(tmp, RUN_FILE.format(index=index)))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(final, checkpoint=checkpoint)


def _state(result: TrainResult, seconds: float) -> dict:
    return {"model": result.model.state_dict(),
            "ema": result.ema.module.state_dict() if result.ema is not None else None,
            "history": result.history, "train_s": seconds}


@dataclass
class TrainedRun:
    net: torch.nn.Module
    history: list[dict]
    train_s: float


def study_trainer(runs: list[dict], workers: int, run_config, *, resources_per_worker: dict | None = None,
                  threads: int | None = None, mixture_modes: int = 8, mixture_seed: int = 0,
                  parallel: str = "runs", probe: dict | None = None):
    """The TorchTrainer that trains ``runs`` ({dataset, method_name, method: TwinFlowConfig, train:
    TrainSettings}) with ``worker_loop``: the one place that knows the loop's config format (the
    study's ``fit_runs`` and the sweep's digits trials both build it here). ``probe``: rank 0 reports
    1-NFE quality with every log row (tune/probes.py)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    resources = dict(resources_per_worker or {"CPU": 1})
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // workers)
    config = {"runs": [{"dataset": r["dataset"], "method_name": r["method_name"], "method": to_dict(r["method"]),
                        "train": to_dict(r["train"])} for r in runs],
              "mixture_modes": mixture_modes, "mixture_seed": mixture_seed, "threads_per_worker": threads,
              "parallel": parallel}
    if probe is not None:
        config["probe"] = probe
    return TorchTrainer(worker_loop, train_loop_config=config,
                        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker=resources),
                        torch_config=TorchConfig(backend="gloo", timeout_s=600), run_config=run_config)


def fit_runs(runs: list[dict], workers: int, storage: Path, name: str, mixture_modes: int,
             mixture_seed: int, parallel: str = "runs") -> list[TrainedRun]:
    """Train ``runs`` in one Ray Train job (``study_trainer``); return each run's sampling network (EMA
    weights when kept) in order."""
    from ray.train import CheckpointConfig, RunConfig

    trainer = study_trainer(runs, workers, RunConfig(name=name, storage_path=str(storage.resolve()),
                                                     checkpoint_config=CheckpointConfig(num_to_keep=None)),
                            mixture_modes=mixture_modes, mixture_seed=mixture_seed, parallel=parallel)
    result = trainer.fit()
    states: dict[int, dict] = {}
    for checkpoint, _ in result.best_checkpoints:
        with checkpoint.as_directory() as d:
            for i in range(len(runs)):
                path = Path(d) / RUN_FILE.format(index=i)
                if path.is_file():
                    states[i] = torch.load(path, map_location="cpu", weights_only=True)
    missing = [f"{r['dataset']}/{r['method_name']}" for i, r in enumerate(runs) if i not in states]
    if missing:
        raise RuntimeError(f"Ray Train finished without checkpoints for: {', '.join(missing)}")
    trained = []
    for i, r in enumerate(runs):
        state = states[i]
        net = build_net(load_dataset(r["dataset"], mixture_modes, mixture_seed), r["train"].net)
        net.load_state_dict(state["ema"] if state["ema"] is not None else state["model"])
        trained.append(TrainedRun(net.eval(), state["history"], float(state["train_s"])))
    return trained
