"""The Qwen-Image adapter under DeepSpeed: build the model where ZeRO wants it, wrap it, pick the teacher.

ZeRO-2 (and LoRA): the model is loaded on CPU as diffusers does (meta init, weights streamed in),
then ``deepspeed.initialize`` moves it to the device and shards optimizer state and gradients.
ZeRO-3: the model is built inside ``deepspeed.zero.Init`` so no rank ever holds all of it; the
safetensors shards stream in module by module under ``GatheredParameters(modifier_rank=0)``.

ZeRO-3 gathers each layer's weights with a collective every time the network runs, so every
rank must run it the same number of times per micro-batch. The TwinFlow objective's no-grad
passes depend on which blocks a rank holds (fake rows → one-step fakes, enhanced rows → CFG
teacher, far rows → RCGM rollout, one-step rows → Δv), so ``CallEqualizer`` counts the passes
and tops every rank up to the config's maximum with one-row dummy passes before backward.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from twinflow.method.config import TwinFlowConfig
from twinflow.method.meanflow import MeanFlowConfig, SCMConfig
from twinflow.method.rows import select_rows
from twinflow.train.config import TrainConfig
from twinflow.train.ds_config import lr_scheduler_factory


def load_velocity(cfg: TrainConfig, model_path: str, ds_config: dict):
    """This rank's QwenImageVelocity of ``model_path``: whole on CPU (ZeRO-2), or partitioned as it is
    built (ZeRO-3). The student, and under ZeRO-3 DMD's fake and real copies (train/fake_score.py)."""
    import deepspeed

    from twinflow.models.loading import build_velocity_model

    mcfg = dataclasses.replace(cfg.model, path=model_path)
    if ds_config["zero_optimization"]["stage"] == 3:
        init = deepspeed.zero.Init(config_dict_or_path=ds_config)
        return build_velocity_model(
            mcfg, init_context=init,
            gather_context=lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))
    return build_velocity_model(mcfg)


def build_engine(cfg: TrainConfig, model_path: str, ds_config: dict):
    """(DeepSpeed engine, the unwrapped QwenImageVelocity) for this rank."""
    import deepspeed

    from twinflow.models.qwen_velocity import trainable_parameters

    velocity = load_velocity(cfg, model_path, ds_config)
    params = trainable_parameters(velocity)
    if not params:
        raise RuntimeError("the model has no trainable parameters (check model.mode and model.lora.targets)")
    optimizer = None
    if cfg.deepspeed.optimizer == "torch":
        o = cfg.optim
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=velocity, model_parameters=params, optimizer=optimizer,
                                           lr_scheduler=lr_scheduler_factory(cfg), config=ds_config)
    return engine, engine.module


def reset_lr_schedule(engine, cfg: TrainConfig) -> None:
    """Make the (restored) LambdaLR follow *this* submission's schedule settings.

    ``LambdaLR.load_state_dict`` also restores the schedule object's attributes; a re-submission
    that raises run.max_steps must decay over the new horizon, while the step count stays restored.
    """
    from twinflow.train.ds_config import LrSchedule

    sched = engine.lr_scheduler
    if sched is None:
        return
    fresh = LrSchedule(cfg.optim, cfg.run.max_steps)
    for fn in getattr(sched, "lr_lambdas", []):
        if isinstance(fn, LrSchedule):
            fn.__dict__.update(fresh.__dict__)
    # Recompute the current LR from the restored step with the (possibly new) schedule.
    for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(sched.last_epoch)


def max_network_calls(tf: TwinFlowConfig | MeanFlowConfig | SCMConfig) -> int:
    """Upper bound on the network passes of one objective call (method/objective.py, method/meanflow.py)."""
    if isinstance(tf, (MeanFlowConfig, SCMConfig)):
        return 3  # the pass with gradient + the tangent's two finite-difference passes
    w = tf.weights()
    calls = 1  # the pass with gradient
    if w.fake > 0:
        calls += 1  # one-step fakes
    if tf.enhance_ratio > 0:
        calls += 2  # CFG teacher: conditional and unconditional
    if w.near_diag > 0 or w.any_step > 0 or (w.one_step > 0 and tf.one_step_rcgm):
        calls += tf.rcgm_order  # RCGM rollout
    if tf.rectify_coef > 0 and w.one_step > 0:
        calls += 2  # Δv = F(y, −τ, −τ) − F(y, τ, τ)
    return calls


class CallEqualizer:
    """Counts forward passes of ``module`` and pads a rank up to ``bound`` passes (ZeRO-3 only)."""

    def __init__(self, module: torch.nn.Module, bound: int):
        self.module = module
        self.bound = bound
        self.count = 0
        self.padded = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1

    def begin(self) -> None:
        """Start counting one micro-batch (passes outside training, e.g. sample grids, do not count)."""
        self.count = 0

    def pad(self, x: torch.Tensor, cond: Any) -> None:
        """Run dummy one-row passes until this micro-batch made ``bound`` passes, then reset."""
        if self.count > self.bound:
            raise RuntimeError(f"the objective ran the network {self.count} times, more than the bound {self.bound} "
                               f"that keeps ZeRO-3 ranks in step (train/engine.py max_network_calls is out of date)")
        missing = self.bound - self.count
        if missing:
            x1 = x[:1]
            ones = torch.ones(1, device=x.device)
            c1 = select_rows(cond, torch.zeros(1, dtype=torch.long, device=x.device))
            with torch.no_grad():
                for _ in range(missing):
                    self.module(x1, ones, ones, c1)
        self.padded += missing
        self.count = 0

    def remove(self) -> None:
        self._handle.remove()
