"""TwinFlow method math: path, block mix, objective, teachers, any-step sampler.

Pure torch; nothing here imports torch.distributed, Ray or DeepSpeed.
"""

from twinflow.method.blocks import (Block, BatchLayout, BlockWeights, LossNorm, allocate_micro_batch,
                                    block_counts, weights_from_lambda)
from twinflow.method.config import PRESETS, TwinFlowConfig, fm, rcgm, twinflow, twinflow_unbiased
from twinflow.method.objective import ObjectiveOutput, TwinFlowObjective, rcgm_target
from twinflow.method.sampler import SamplerConfig, few_step, ode, sample, time_grid
from twinflow.method.teacher import EmaTeacher, EmaWeights, FrozenTeacher, SelfTeacher, make_teacher

__all__ = [
    "Block", "BatchLayout", "BlockWeights", "LossNorm", "allocate_micro_batch", "block_counts",
    "weights_from_lambda", "PRESETS", "TwinFlowConfig", "fm", "rcgm", "twinflow", "twinflow_unbiased", "ObjectiveOutput",
    "TwinFlowObjective", "rcgm_target", "SamplerConfig", "few_step", "ode", "sample", "time_grid",
    "EmaTeacher", "EmaWeights", "FrozenTeacher", "SelfTeacher", "make_teacher",
]
