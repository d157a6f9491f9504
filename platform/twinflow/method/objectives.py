"""Every objective the platform trains, by config type: TwinFlow (and its FM / RCGM presets) and the rivals.

One place maps a method config to its objective and back from a plain dict, so trainers and Ray
payloads never switch on names themselves. TwinFlow, MeanFlow and sCM are "one network, one loss"
objectives a trainer calls exactly like TwinFlow's; DMD2 / VSD also own a fake score and its optimizer
(method/dmd.py), so a trainer builds them with ``DMDObjective`` and a teacher.
"""

from __future__ import annotations

from typing import Any, Union

from twinflow.config.tree import from_dict
from twinflow.method.config import TwinFlowConfig
from twinflow.method.dmd import DMDConfig
from twinflow.method.meanflow import MeanFlowConfig, MeanFlowObjective, SCMConfig, SCMObjective
from twinflow.method.objective import TwinFlowObjective

MethodConfig = Union[TwinFlowConfig, MeanFlowConfig, SCMConfig, DMDConfig]

_BY_NAME = {"meanflow": MeanFlowConfig, "scm": SCMConfig, "dmd2": DMDConfig, "vsd": DMDConfig}
"""Rival configs carry their ``name``; a dict without one is a TwinFlowConfig (fm / rcgm / twinflow)."""


def method_from_dict(d: dict[str, Any]) -> MethodConfig:
    name = d.get("name")
    if name is None:
        return from_dict(TwinFlowConfig, d)
    if name not in _BY_NAME:
        raise ValueError(f"method name {name!r}: choose one of {', '.join(_BY_NAME)} (or omit it for TwinFlow)")
    return from_dict(_BY_NAME[name], d)


def needs_teacher_model(cfg: MethodConfig) -> bool:
    """Methods that distil a pretrained model and need one to start from: DMD2 / VSD, and MeanFlow / sCM with
    ``velocity: teacher`` (mean-flow / consistency *distillation*); the others train from anything."""
    return isinstance(cfg, DMDConfig) or getattr(cfg, "velocity", "data") == "teacher"


def single_network_objective(cfg: MethodConfig):
    """The objective of a method that trains one network with one optimizer."""
    if isinstance(cfg, TwinFlowConfig):
        return TwinFlowObjective(cfg)
    if isinstance(cfg, MeanFlowConfig):
        return MeanFlowObjective(cfg)
    if isinstance(cfg, SCMConfig):
        return SCMObjective(cfg)
    raise TypeError(f"{type(cfg).__name__} trains a fake score beside the model; build a DMDObjective")
