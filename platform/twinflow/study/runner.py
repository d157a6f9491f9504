"""Run the study: train every (dataset, method) through Ray Train, sample at each NFE, score, report."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from twinflow.config.tree import to_dict
from twinflow.method import SamplerConfig, ode, sample
from twinflow.method.sampler import method_sampler
from twinflow.ray_env import connect
from twinflow.study.ablation import ABLATIONS, cell_name
from twinflow.study.config import StudyConfig
from twinflow.study.datasets import Digits, Mixture2D
from twinflow.study.metrics import DigitsJudge, mixture_floor, score_mixture
from twinflow.study.ray_job import fit_runs, load_dataset
from twinflow.study.report import save_ablation_plot, save_grids, save_lambda_plot, write_markdown
from twinflow.study.seeds import HEADLINE, combine, ratios_to_reference


def sampler_for(method: str, nfe: int, cfg: StudyConfig) -> SamplerConfig:
    """FM integrates its ODE; MeanFlow jumps along its average velocity (r = next t, deterministic, as its
    paper samples); RCGM / TwinFlow / sCM / DMD2 / VSD use the released few-step sampler (predict the data
    at r = 0, re-noise: multistep consistency sampling), then many-step."""
    if method == "fm":
        return ode(nfe)
    if method == "meanflow" or nfe <= cfg.eval.few_step_max_nfe:
        return method_sampler(method, nfe)
    return SamplerConfig(steps=nfe, gap=(0.001, 0.0), stochastic_ratio=0.0, style=cfg.eval.many_step_style)


def generate(net: torch.nn.Module, data: Digits | Mixture2D, cfg: StudyConfig, sampler: SamplerConfig,
             seed: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(data, Digits):
        noise = torch.randn(len(labels), data.data_dim, generator=g)
        return sample(net, noise, labels, sampler, g)
    noise = torch.randn(cfg.eval.mixture_samples, data.data_dim, generator=g)
    return sample(net, noise, None, sampler, g)


def eval_labels(data: Digits, cfg: StudyConfig) -> torch.Tensor:
    per = cfg.eval.digits_samples_per_class
    return data.labels.clone() if per == 0 else torch.arange(data.num_classes).repeat_interleave(per)


ONE_STEP_ONLY = ("dmd2", "vsd")
"""Methods whose student is trained at (1, 0) alone: sampling it at more steps would query times it never
saw (DMD2's multi-step form trains with backward simulation, not implemented), so they are scored at 1 NFE."""


def evaluate(net: torch.nn.Module, method: str, data: Digits | Mixture2D, cfg: StudyConfig,
             judge: DigitsJudge | None) -> tuple[dict, dict[int, torch.Tensor]]:
    """{nfe_k: {metric: mean over seeds, metric_std: ...}} and the first seed's samples per NFE."""
    results, first = {}, {}
    labels = eval_labels(data, cfg) if isinstance(data, Digits) else None
    for nfe in cfg.eval.nfe:
        if method in ONE_STEP_ONLY and nfe != 1:
            continue
        sampler = sampler_for(method, nfe, cfg)
        per_seed = []
        for seed in range(cfg.eval.seeds):
            x = generate(net, data, cfg, sampler, seed, labels)
            first.setdefault(nfe, x)
            if judge is not None:
                per_seed.append(judge.score(x.numpy(), labels.numpy()))
            else:
                per_seed.append(score_mixture(x, data, seed))
        row = {m: float(np.mean([d[m] for d in per_seed])) for m in per_seed[0]}
        row.update({f"{m}_std": float(np.std([d[m] for d in per_seed])) for m in per_seed[0]})
        row["sampler"] = f"{sampler.style} r-style, rho={sampler.stochastic_ratio:g}"
        results[f"nfe_{nfe}"] = row
    return results, first


def reference_floor(data: Digits | Mixture2D, cfg: StudyConfig, judge: DigitsJudge | None) -> dict:
    if judge is not None:
        return judge.real_floor()
    floors = [mixture_floor(data, cfg.eval.mixture_samples, s) for s in range(cfg.eval.seeds)]
    return {m: float(np.mean([f[m] for f in floors])) for m in floors[0]} | {"samples": cfg.eval.mixture_samples}


def study_runs(cfg: StudyConfig) -> list[dict]:
    """(dataset, method, training seed) runs of the comparison, or TwinFlow at each λ for --sweep-lam."""
    if cfg.sweep_lam:
        cells = [{"dataset": d, "method_name": f"twinflow_lam{lam:.4f}",
                  "method": replace(cfg.method.twinflow, lam=lam, block_weights=None), "lam": lam}
                 for d in cfg.datasets for lam in cfg.sweep_lam]
    else:
        cells = [{"dataset": d, "method_name": m, "method": getattr(cfg.method, m)}
                 for d in cfg.datasets for m in cfg.methods]
        for d in cfg.datasets:
            for v in cfg.ablation:
                method, train = copy.deepcopy(cfg.method.twinflow), copy.deepcopy(getattr(cfg, d))
                ABLATIONS[v].edit(method, train)
                cells.append({"dataset": d, "method_name": cell_name(v), "method": method, "train": train,
                              "sampler": "twinflow"})
    runs = []
    for cell in cells:
        train = cell.pop("train", None) or getattr(cfg, cell["dataset"])
        for k in range(cfg.train_seeds):
            runs.append({**cell, "train": replace(train, seed=train.seed + k), "train_seed": k})
    return runs


def run_study(cfg: StudyConfig, log=print) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    connect()
    runs = study_runs(cfg)
    cells = list(dict.fromkeys(f"{r['dataset']}/{r['method_name']}" for r in runs))
    seeds = f" × {cfg.train_seeds} training seeds" if cfg.train_seeds > 1 else ""
    log(f"training {len(runs)} runs ({', '.join(cells)}{seeds}) on {cfg.workers} Ray Train workers "
        f"(parallel: {cfg.parallel})")
    t0 = time.time()
    trained = fit_runs(runs, cfg.workers, out / "ray", f"study-{time.strftime('%Y%m%d-%H%M%S')}",
                       cfg.mixture.modes, cfg.mixture.seed, cfg.parallel)
    log(f"training done in {time.time() - t0:.0f}s; evaluating")

    results: dict = {"config": to_dict(cfg)}
    reference: dict = {}
    timing: dict = {"train_job_s": round(time.time() - t0, 1)}
    judges: dict = {}
    per_seed: dict = {}  # (dataset, cell name) -> [scores of each training seed]
    for run, tr in zip(runs, trained):
        ds, method, k = run["dataset"], run["method_name"], run["train_seed"]
        data = load_dataset(ds, cfg.mixture.modes, cfg.mixture.seed)
        if ds not in judges:
            judges[ds] = DigitsJudge.fit(data) if isinstance(data, Digits) else None
            reference[ds] = reference_floor(data, cfg, judges[ds])
        t1 = time.time()
        sampler_name = "twinflow" if "lam" in run else run.get("sampler", method)
        scores, samples = evaluate(tr.net, sampler_name, data, cfg, judges[ds])
        per_seed.setdefault((ds, method), []).append(scores)
        if "lam" not in run and k == 0:
            save_grids(out, ds, method, samples, data)
        name = f"{ds}/{method}" + (f"/seed{k}" if cfg.train_seeds > 1 else "")
        timing[name] = {"train_s": round(tr.train_s, 1), "eval_s": round(time.time() - t1, 1),
                        "final_loss": tr.history[-1].get("loss/total")}
        log(f"{name}: evaluated in {time.time() - t1:.0f}s")
    timing["total_s"] = round(time.time() - t0, 1)
    sweep: dict = {}
    for run in runs:
        if run["train_seed"] != 0:
            continue
        ds, method = run["dataset"], run["method_name"]
        cell = combine(per_seed[(ds, method)])
        if "lam" in run:
            sweep.setdefault(ds, {})[f"{run['lam']:.4f}"] = cell
        else:
            results.setdefault(ds, {})[method] = cell
    if cfg.ablation:
        save_ablation_plot(out / "ablation.png", results, [cell_name(v) for v in cfg.ablation])
    if sweep:
        results["lam_sweep"] = sweep
        save_lambda_plot(out / "lam_sweep.png", sweep)
    ratios = {ds: ratios_to_reference(results[ds], reference[ds], HEADLINE[ds]) for ds in cfg.datasets
              if ds in results}
    results["ratios"] = {ds: r for ds, r in ratios.items() if r}
    results["reference"] = reference
    results["timing"] = timing
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = write_markdown(out / "results.md", results, cfg)
    log(table)
    return results
