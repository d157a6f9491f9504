"""One (dataset, method) training run of the study, written once for any rank/world size.

``train_run`` is called inside each Ray Train worker (study/ray_job.py) with the worker's rank
and a ``wrap`` that applies DDP; run in-process with rank 0 of 1 it is the same loop, which is
how the unit tests and quick experiments call it. Blocks are allocated over the global batch
(method/blocks.py), so 2 workers × 128 rows see exactly the λ proportions of 256.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Callable, Literal

import torch
from torch import nn

from twinflow.config.errors import require
from twinflow.method import (BatchLayout, BlockWeights, EmaWeights, FrozenTeacher, LossNorm, SelfTeacher,
                             TwinFlowConfig, allocate_micro_batch, fm, make_teacher)
from twinflow.method.dmd import DMDConfig, DMDObjective, Discriminator
from twinflow.method.objectives import MethodConfig, needs_teacher_model, single_network_objective
from twinflow.method.lr_schedule import cosine_factor, warmup_factor
from twinflow.models.toy import DigitsNet, ToyMLP
from twinflow.study.datasets import Digits, Mixture2D


@dataclass
class NetSettings:
    width: int = 256
    depth: int = 4


@dataclass
class TrainSettings:
    steps: int = 4000
    batch_size: int = 256
    """Global batch per optimizer step (split evenly over workers)."""
    lr: float = 1e-3
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    """EMA of the weights used for sampling (0 samples the raw weights)."""
    seed: int = 0
    log_every: int = 100
    distill_steps: int = 0
    """Teacher-based methods only (DMD2 / VSD; MeanFlow / sCM with velocity: teacher): ``steps`` of flow
    matching make the teacher (the same run as the study's FM cell, same seed), then this many
    distillation steps; 0 = steps // 4."""
    net: NetSettings = field(default_factory=NetSettings)

    def validate(self, path: str) -> None:
        require(self.steps >= 1, f"{path}.steps", "must be >= 1")
        require(self.batch_size >= 1, f"{path}.batch_size", "must be >= 1")
        require(self.lr > 0, f"{path}.lr", "must be positive")
        require(0 <= self.ema_decay < 1, f"{path}.ema_decay", "must be in [0, 1)")


def build_net(data: Digits | Mixture2D, net: NetSettings) -> nn.Module:
    if isinstance(data, Digits):
        return DigitsNet(data_dim=data.data_dim, width=net.width, depth=net.depth, num_classes=data.num_classes)
    return ToyMLP(data_dim=data.data_dim, width=net.width, depth=net.depth)


def lr_factor(step: int, s: TrainSettings) -> float:
    """LR multiplier of optimizer step ``step`` (0-based, as LambdaLR counts): the shared linear warm-up
    times, for cosine, a cosine over the whole run (method/lr_schedule.py)."""
    warm = warmup_factor(step, s.warmup_steps)
    if s.lr_schedule == "constant":
        return warm
    return warm * cosine_factor(step / s.steps)


@dataclass
class TrainResult:
    model: nn.Module  # raw (unwrapped) weights
    ema: EmaWeights | None
    history: list[dict[str, float]]

    def sampling_net(self) -> nn.Module:
        return (self.ema.module if self.ema is not None else self.model).eval()


def train_run(data: Digits | Mixture2D, method: MethodConfig, s: TrainSettings, rank: int = 0, world_size: int = 1,
              wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
              report: Callable[[int, dict[str, float]], None] | None = None,
              reduce_stats: Callable[[dict], dict] = lambda stats: stats,
              probe: Callable[[nn.Module], dict[str, float]] | None = None) -> TrainResult:
    """``probe``, when given, scores the sampling network (EMA weights when kept) at every log
    step; its metrics join that step's row (history and ``report``). It runs in eval mode on this
    rank only and must not use collectives (the Tune sweeps give it to rank 0, jobs/tune_lambda.py)."""
    if s.batch_size % world_size:
        raise ValueError(f"batch_size {s.batch_size} is not divisible by {world_size} workers")
    layout = BatchLayout(micro_batch=s.batch_size // world_size, world_size=world_size)
    # Rivals have no block mix: every row is one of theirs (ids unused, the norm is the global batch).
    weights = method.weights() if isinstance(method, TwinFlowConfig) else BlockWeights(0, 1, 0, 0)
    norm = LossNorm.global_(weights, layout)

    if needs_teacher_model(method):
        # The teacher is the study's flow-matching run (same settings and seed), then distilled.
        base = train_run(data, _study_fm(), s, rank, world_size, wrap, None, reduce_stats)
        raw = copy.deepcopy(base.sampling_net()).train().requires_grad_(True)
        s = replace(s, steps=s.distill_steps or max(1, s.steps // 4), warmup_steps=0)
    else:
        torch.manual_seed(s.seed)  # identical initial weights on every rank
        raw = build_net(data, s.net)
    model = wrap(raw)
    teacher = _teacher_for(method, raw)
    ema = EmaWeights(raw, s.ema_decay, warmup=True) if s.ema_decay > 0 else None
    opt = torch.optim.AdamW(raw.parameters(), lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, s))
    if isinstance(method, DMDConfig):
        fake_raw = copy.deepcopy(raw)
        disc = None
        if method.gan_weight > 0:
            if world_size > 1:  # DDP would average the fake net's gradients but not the head's
                raise ValueError("method.dmd2.gan_weight > 0 trains its GAN head outside DDP; use parallel: runs")
            disc = Discriminator(fake_raw)
        fake_params = list(fake_raw.parameters()) + (list(disc.parameters()) if disc else [])
        fake_opt = torch.optim.AdamW(fake_params, lr=s.lr * method.fake_lr_scale, betas=s.betas,
                                     weight_decay=s.weight_decay)
        objective = DMDObjective(method, teacher.velocity, wrap(fake_raw), fake_opt, fake_params,
                                 s.grad_clip, fake_eval=fake_raw, discriminator=disc)
    else:
        objective = single_network_objective(method)
    gen = torch.Generator().manual_seed(s.seed * 1000 + rank + 1)
    conditional = isinstance(data, Digits)
    history: list[dict[str, float]] = []
    acc: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    for step in range(s.steps):
        ids = allocate_micro_batch(weights, layout, rank, 0, step)
        x, y = data.batch(layout.micro_batch, gen)
        # The unconditional "prompt" for CFG enhancement on class labels: a random permutation
        # of the batch's labels (the reference MNIST tutorial's choice; there is no null class).
        uncond = y[torch.randperm(len(y), generator=gen)] if (conditional and _wants_uncond(method)) else None
        if hasattr(objective, "set_step"):
            objective.set_step(step)
        out = objective(model, x, y, ids, uncond=uncond, teacher=teacher, model_nograd=raw, generator=gen, norm=norm)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(), s.grad_clip)
        opt.step()
        sched.step()
        teacher.update(raw)
        if ema is not None:
            ema.update(raw)
        for k, (tot, cnt) in out.stats.items():
            _accumulate(acc, k, tot, cnt)
        _accumulate(acc, "grad_norm", gnorm.detach(), torch.tensor(1.0))
        if (step + 1) % s.log_every == 0 or step + 1 == s.steps:
            totals = reduce_stats(acc)
            row = {k: float(t) / max(float(c), 1e-12) for k, (t, c) in totals.items()}
            row["lr"] = sched.get_last_lr()[0]
            if probe is not None:
                row.update(_run_probe(probe, ema.module if ema is not None else raw))
            history.append({"step": step + 1, **row})
            if report is not None:
                report(step + 1, row)
            acc = {}
    return TrainResult(model=raw, ema=ema, history=history)


def _study_fm() -> TwinFlowConfig:
    cfg = fm()
    cfg.enhance_ratio = 0.0
    return cfg


def _teacher_for(method: MethodConfig, raw: nn.Module):
    """TwinFlow's configured teacher; the pretrained weights (frozen) for a distilling rival; else the online
    network, which a rival training from data never calls."""
    if isinstance(method, TwinFlowConfig):
        return make_teacher(method.teacher, raw, method.teacher_ema_decay)
    return FrozenTeacher(raw) if needs_teacher_model(method) else SelfTeacher(raw)


def _wants_uncond(method: MethodConfig) -> bool:
    if isinstance(method, TwinFlowConfig):
        return method.enhance_ratio > 0
    return isinstance(method, DMDConfig) and method.guidance > 1


def _run_probe(probe: Callable[[nn.Module], dict[str, float]], net: nn.Module) -> dict[str, float]:
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            return probe(net)
    finally:
        net.train(was_training)


def _accumulate(acc: dict, name: str, total: torch.Tensor, count: torch.Tensor) -> None:
    prev_total, prev_count = acc.get(name, (torch.zeros(()), torch.zeros(())))
    acc[name] = (prev_total + total, prev_count + count)
