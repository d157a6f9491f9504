"""The teacher f̄ used for CFG enhancement and RCGM rollouts, and EMA weight averaging.

Three modes (docs/METHOD.md §12):
  self    the online network itself, evaluated without gradient (no extra memory: the 20B default)
  ema     an exponential moving average of the online weights, with the reference's warm-up:
          the first update copies, then the decay d climbs toward its target as
          d ← d + (1 − d)(d_target − d)/2
  frozen  the initial weights, never updated; it serves as the CFG teacher only, and RCGM
          rollouts use the online network (``rollout_uses_online``), as the reference does.
A LoRA model implements the same protocol with a second adapter instead of a module copy
(see twinflow.models.qwen_image).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Protocol

import torch
from torch import nn

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""F(x_t, t, r, cond) -> average velocity, same shape as x_t; t and r are [B] signed times."""


class Teacher(Protocol):
    rollout_uses_online: bool

    def velocity(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: Any) -> torch.Tensor: ...

    def update(self, online: nn.Module) -> None: ...


class SelfTeacher:
    """f̄ = the online network, called under no_grad."""

    rollout_uses_online = False

    def __init__(self, net: VelocityFn):
        self.net = net

    @torch.no_grad()
    def velocity(self, x, t, r, cond):
        return self.net(x, t, r, cond)

    def update(self, online: nn.Module) -> None:
        pass


class EmaDecay:
    """The EMA decay and its warm-up, the one rule for every EMA here (module copies below, the LoRA
    "ema" adapter in twinflow.models.lora).

    An update lerps the EMA toward the online weights by 1 − ``current_decay`` and then calls
    ``_advance``. ``warmup=True`` follows the reference schedule: the first update copies (d = 0), then
    d ← d + (1 − d)(d_target − d)/2 after each update; ``warmup=False`` uses ``decay`` from the first
    update. ``current_decay``, ``num_updates`` and ``target_decay`` are saved with the EMA weights.
    """

    def __init__(self, decay: float, warmup: bool = True):
        self.target_decay = float(decay)
        self.current_decay = 0.0 if warmup else float(decay)
        self.num_updates = 0

    def _advance(self) -> None:
        """After an update made with ``current_decay``: count it and move the decay on."""
        d = self.current_decay
        self.num_updates += 1
        self.current_decay = d + (1 - d) * (self.target_decay - d) / 2

    def _decay_state(self) -> dict:
        return {"current_decay": self.current_decay, "num_updates": self.num_updates,
                "target_decay": self.target_decay}

    def _load_decay_state(self, state: dict) -> None:
        self.current_decay = float(state["current_decay"])
        self.num_updates = int(state["num_updates"])


class EmaWeights(EmaDecay):
    """A frozen copy of a module whose parameters track an EMA of the online ones (warm-up: EmaDecay)."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        super().__init__(decay, warmup)
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        src_params = list(online.parameters())
        if len(ema_params) != len(src_params):
            raise ValueError("EMA module and online module have different parameter lists")
        d = self.current_decay
        torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for p, e in zip(src_params, ema_params)], 1.0 - d)
        for eb, sb in zip(self.module.buffers(), online.buffers()):
            eb.copy_(sb)
        self._advance()

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), **self._decay_state()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self._load_decay_state(state)


class EmaTeacher(EmaWeights):
    rollout_uses_online = False

    @torch.no_grad()
    def velocity(self, x, t, r, cond):
        return self.module(x, t, r, cond)


class FrozenTeacher:
    """The weights as they were when training started; never updated."""

    rollout_uses_online = True

    def __init__(self, module: nn.Module):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def velocity(self, x, t, r, cond):
        return self.module(x, t, r, cond)

    def update(self, online: nn.Module) -> None:
        pass


def make_teacher(mode: str, online: nn.Module, ema_decay: float = 0.99) -> Teacher:
    """Teacher for a plain (non-LoRA) module; ``online`` must be the unwrapped network."""
    if mode == "self":
        return SelfTeacher(online)
    if mode == "ema":
        return EmaTeacher(online, ema_decay)
    if mode == "frozen":
        return FrozenTeacher(online)
    raise ValueError(f"unknown teacher mode {mode!r}; use self, ema or frozen")
