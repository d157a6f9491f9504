"""One training step of every method on the same rig (calibrate.Rig): what jobs/bench_train.py measures.

TwinFlow and its presets, MeanFlow and sCM train the rig's network alone. DMD2 / VSD also need a fake
score and a real score, built here in the two forms the memory comparison is about
(docs/METHOD.md §19):
  full  the fake score is a trained copy of the transformer (own AdamW), the real score a frozen copy;
  lora  one base: the student is the rig's adapter, the fake score a second adapter "fake" (trained,
        own AdamW over its LoRA weights), the real score the base with every adapter disabled.
``extra_static_bytes`` counts what a method keeps beside the rig for the whole run (copies, the fake
score's optimizer state), so a measured peak stays "static tensors + the step's high-water mark".
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Callable

import torch
from torch import nn

from twinflow.method.config import TwinFlowConfig
from twinflow.method.dmd import DMDConfig, DMDObjective
from twinflow.method.objectives import MethodConfig, single_network_objective
from twinflow.models.lora import FAKE_ADAPTER, AdapterVelocity, add_fake_adapter, fake_adapter_training
from twinflow.plan.calibrate import Rig
from twinflow.plan.measure import StepResult, objective_step, tensor_bytes


def lora_dmd(cfg: DMDConfig, velocity: nn.Module, transformer: nn.Module, lr: float) -> tuple[DMDObjective, list]:
    """DMD2 / VSD on one LoRA base: adds the "fake" adapter (a copy of the student's) and returns the
    objective and the fake score's parameters."""
    params = add_fake_adapter(transformer)  # copied from the student, frozen until active
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0, foreach=True)
    objective = DMDObjective(cfg, real=AdapterVelocity(velocity, transformer, None), fake=velocity, fake_opt=opt,
                             fake_params=params, grad_clip=None,
                             fake_context=partial(fake_adapter_training, transformer),
                             fake_eval=AdapterVelocity(velocity, transformer, FAKE_ADAPTER))
    return objective, params


class MethodSteps:
    """``step(name, measure)`` for each configured method on ``rig``; DMD's extra networks built once."""

    def __init__(self, rig: Rig, methods: dict[str, MethodConfig], lora: bool):
        self.rig, self.methods, self.lora = rig, methods, lora
        self._dmd: dict[str, tuple[DMDObjective, Callable[[], int]]] = {}
        self._single: dict[str, object] = {}

    def step(self, name: str, measure: bool = False) -> StepResult:
        cfg, rig = self.methods[name], self.rig
        if isinstance(cfg, TwinFlowConfig):  # the rig's own path: block ids, the CFG uncond
            return rig.step(cfg, measure=measure)
        if isinstance(cfg, DMDConfig):
            objective = self._dmd_objective(name, cfg)[0]
        else:
            if name not in self._single:
                self._single[name] = single_network_objective(cfg)
            objective = self._single[name]
        return objective_step(rig.velocity, objective, rig.optimizer, rig.latents, rig.cond, rig.block_ids,
                              generator=rig.generator, measure=measure)

    def extra_static_bytes(self, name: str) -> int:
        """Bytes a method keeps beside the rig (call after a warm-up step: optimizer state is lazy)."""
        cfg = self.methods[name]
        return self._dmd_objective(name, cfg)[1]() if isinstance(cfg, DMDConfig) else 0

    def _dmd_objective(self, name: str, cfg: DMDConfig):
        if name not in self._dmd:
            rig = self.rig
            lr = rig.optimizer.param_groups[0]["lr"]
            if self.lora:
                objective, _ = lora_dmd(cfg, rig.velocity, rig.transformer, lr)
                # the adapter's weights are already in the rig's transformer; its AdamW state is not
                extra = lambda: tensor_bytes(None, objective.fake_opt)["optimizer"]  # noqa: E731
            else:
                fake_tr = copy.deepcopy(rig.transformer).requires_grad_(True)
                real_tr = copy.deepcopy(rig.transformer).requires_grad_(False).eval()
                make = type(rig.velocity.inner)
                opt = torch.optim.AdamW(list(fake_tr.parameters()), lr=lr, betas=(0.9, 0.99), weight_decay=0.0,
                                        foreach=True)
                objective = DMDObjective(cfg, real=make(real_tr), fake=make(fake_tr), fake_opt=opt,
                                         fake_params=list(fake_tr.parameters()), grad_clip=None)

                def extra() -> int:
                    f, r = tensor_bytes(fake_tr, opt, grads=False), tensor_bytes(real_tr, grads=False)
                    return f["params"] + f["buffers"] + f["optimizer"] + r["params"] + r["buffers"]
            self._dmd[name] = (objective, extra)
        return self._dmd[name]
