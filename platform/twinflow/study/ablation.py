"""The loss ablation (--ablation): TwinFlow variants beside the study's other cells, same seeds, same scoring.

Each variant is the study's TwinFlow cell (method.twinflow, the dataset's TrainSettings) with one change,
so a row of the table differs from ``default`` by exactly what its name says. The question (docs/METHOD.md
§11): the released robust loss (Barron α = 1 and the ±1 clip) minimises near-diagonal rows to a clipped
geometric median of v given x_t instead of E[v | x_t], which matters on multimodal data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from twinflow.method import TwinFlowConfig
from twinflow.method.config import unbiased
from twinflow.study.trainer import TrainSettings


@dataclass(frozen=True)
class Variant:
    doc: str
    edit: Callable[[TwinFlowConfig, TrainSettings], None]


def _l2_near_diag(m: TwinFlowConfig, s: TrainSettings) -> None:
    m.block_loss.near_diag.loss, m.block_loss.near_diag.clip = "l2", False


def _real_velocity(m: TwinFlowConfig, s: TrainSettings) -> None:
    m.real_velocity_weight = 1.0


def _both(m: TwinFlowConfig, s: TrainSettings) -> None:
    unbiased(m)  # twinflow_unbiased(): the two changes above together


def _constant_lr(m: TwinFlowConfig, s: TrainSettings) -> None:
    s.lr_schedule = "constant"


def _lam_half(m: TwinFlowConfig, s: TrainSettings) -> None:
    m.lam, m.block_weights = 0.5, None


ABLATIONS: dict[str, Variant] = {
    "default": Variant("the study's TwinFlow: released losses (Barron, clip ±1), λ = 1/3, cosine LR",
                       lambda m, s: None),
    "l2_near_diag": Variant("near-diagonal rows with l2 and no clip", _l2_near_diag),
    "real_velocity": Variant("+ the tutorial's real-velocity term ℓ(F(x_t, t, t), v), weight 1", _real_velocity),
    "l2_near_diag_real_velocity": Variant("both of the above: method.config.twinflow_unbiased()", _both),
    "constant_lr": Variant("constant learning rate after warm-up instead of cosine", _constant_lr),
    "lam_half": Variant("λ = 1/2: the released code's fixed 1:1:1:1 block mix", _lam_half),
}


def cell_name(variant: str) -> str:
    return f"twinflow-{variant}"
