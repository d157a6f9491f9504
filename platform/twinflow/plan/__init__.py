"""Memory planner: per-GPU memory of a TwinFlow Qwen-Image training configuration, before renting GPUs.

  inputs.py       PlanInputs (model/twinflow sections of the training config + DeepSpeed, data, GPU)
  params.py       exact parameter counts from meta-device models (transformer, LoRA, text encoder, VAE)
  activations.py  activation bytes per token per block, derived from the block's structure
  forwards.py     forward calls per objective step (grad / no-grad rows, B-equivalents)
  memory.py       plan_memory(PlanInputs) -> MemoryPlan (breakdown, phases, .fits(), .table())
  presets.py      named plans (jobs/plan.py) and plan_from_train_config (the training dry-run hook)
  measure.py      measured peaks (CUDA allocator / CPU allocator events) and forward counting

Import the submodules or the names below; nothing heavy is imported until a plan is made.
"""

from twinflow.plan.inputs import GIB, GPU_MEMORY, CommBuffers, PlanInputs
from twinflow.plan.memory import MemoryLine, MemoryPlan, plan_memory
from twinflow.plan.presets import PLAN_PRESETS, plan_from_train_config, plan_inputs_from_values

__all__ = ["GIB", "GPU_MEMORY", "CommBuffers", "PlanInputs", "MemoryLine", "MemoryPlan", "plan_memory",
           "PLAN_PRESETS", "plan_from_train_config", "plan_inputs_from_values"]
