"""Named plans for jobs/plan.py, and the hook the training job's ``--dry-run`` calls.

Presets (functions returning ``PlanInputs``; ``--set`` overrides any field):
  qwen-image-lora-512         Qwen-Image 20B, LoRA r64 on the 14 reference targets (fp32 adapters,
                              bf16 base), ZeRO-2, 8 GPUs × micro-batch 4 (the reference LoRA recipe:
                              global batch 32), 512², self teacher, GC on, H100
  qwen-image-full-zero3-1024  Qwen-Image 20B full-parameter, ZeRO-3, 64 GPUs × micro-batch 2, 1024², GC
  tiny                        the random-weight "tiny" pipeline of models/tiny_qwen.py (CPU presets)

For the training job (its config class lives in twinflow/train, not here):
  plan_inputs_from_values(model, twinflow, zero_stage=…, micro_batch=…, …) -> PlanInputs
      plain values, nothing guessed; the explicit way.
  plan_from_train_config(cfg, **overrides) -> MemoryPlan
      reads ``cfg.model`` (ModelConfig) and ``cfg.twinflow`` (TwinFlowConfig), and finds
      the rest under the dotted names listed in ``TRAIN_CONFIG_FIELDS`` (first match wins);
      ``overrides`` (PlanInputs field names) win over the config. A value found nowhere keeps
      PlanInputs' default, except those in ``REQUIRED``, which raise ConfigError naming the fields tried.
"""

from __future__ import annotations

from typing import Any, Callable

from twinflow.config.errors import ConfigError
from twinflow.method.config import TwinFlowConfig, twinflow
from twinflow.models.config import ModelConfig
from twinflow.models.lora import LoraSettings
from twinflow.plan.inputs import PlanInputs


def tiny_architecture(preset: str = "tiny") -> dict[str, Any]:
    """The transformer config ``build_tiny_qwen_image(preset=...)`` writes (same constructor arguments)."""
    from twinflow.models.tiny_qwen import named_architecture

    return named_architecture(preset)


def qwen_image_lora_512() -> PlanInputs:
    return PlanInputs(model=ModelConfig(mode="lora", lora=LoraSettings(rank=64)), twinflow=twinflow(),
                      num_gpus=8, zero_stage=2, micro_batch=4, height=512, width=512, text_tokens=256, gpu="h100")


def qwen_image_full_zero3_1024() -> PlanInputs:
    return PlanInputs(model=ModelConfig(mode="full"), twinflow=twinflow(), num_gpus=64, zero_stage=3,
                      micro_batch=2, height=1024, width=1024, text_tokens=256, gpu="h100")


def tiny() -> PlanInputs:
    from twinflow.models.tiny_qwen import TINY_PRESETS

    return PlanInputs(model=ModelConfig(path="tiny", mode="lora", lora=LoraSettings(rank=4),
                                                 dtype="float32"),
                      architecture=tiny_architecture("tiny"), twinflow=twinflow(), num_gpus=1, zero_stage=0,
                      micro_batch=6, height=64, width=64, text_tokens=16,
                      latent_channels=TINY_PRESETS["tiny"].z_dim, gpu="h100")


PLAN_PRESETS: dict[str, Callable[[], PlanInputs]] = {
    "qwen-image-lora-512": qwen_image_lora_512,
    "qwen-image-full-zero3-1024": qwen_image_full_zero3_1024,
    "tiny": tiny,
}


# ---------------------------------------------------------------------------
# the training job's hook
# ---------------------------------------------------------------------------


def plan_inputs_from_values(model: ModelConfig, twinflow_cfg: TwinFlowConfig | None = None, *,
                            num_gpus: int = 1, zero_stage: int = 2, offload_optimizer: bool = False,
                            offload_params: bool = False, micro_batch: int = 4, grad_accum: int = 1,
                            resolution: int | tuple[int, int] = 512, text_tokens: int = 256,
                            gpu: str = "h100", gpu_memory_gib: float | None = None, margin: float = 0.10,
                            text_encoder_resident: bool = False, vae_resident: bool = False,
                            architecture: dict[str, Any] | None = None, method: str = "twinflow",
                            **buffers: int) -> PlanInputs:
    """PlanInputs from plain values (``resolution``: a square side or (height, width) in pixels;
    ``buffers``: CommBuffers fields such as reduce_bucket_size)."""
    from twinflow.plan.inputs import CommBuffers

    height, width = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    inputs = PlanInputs(model=model, twinflow=twinflow_cfg or twinflow(), architecture=architecture,
                        num_gpus=num_gpus, zero_stage=zero_stage, offload_optimizer=offload_optimizer,
                        offload_params=offload_params, micro_batch=micro_batch, grad_accum=grad_accum,
                        height=int(height), width=int(width), text_tokens=text_tokens, gpu=gpu,
                        gpu_memory_gib=gpu_memory_gib, margin=margin, text_encoder_resident=text_encoder_resident,
                        vae_resident=vae_resident, buffers=CommBuffers(**buffers), method=method)
    inputs.validate()
    return inputs


# PlanInputs field -> dotted names tried in a training config tree, in order.
TRAIN_CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "zero_stage": ("deepspeed.zero_stage", "deepspeed.stage", "train.zero_stage", "zero_stage"),
    "offload_optimizer": ("deepspeed.offload_optimizer", "train.offload_optimizer", "offload_optimizer"),
    "offload_params": ("deepspeed.offload_params", "deepspeed.offload_param", "train.offload_params",
                       "offload_params"),
    "micro_batch": ("deepspeed.micro_batch_per_gpu", "deepspeed.micro_batch", "train.micro_batch", "deepspeed.train_micro_batch_size_per_gpu",
                    "micro_batch"),
    "grad_accum": ("deepspeed.gradient_accumulation", "deepspeed.grad_accum", "deepspeed.gradient_accumulation_steps", "train.grad_accum",
                   "train.gradient_accumulation_steps", "grad_accum"),
    "resolution": ("data.resolution", "data.dataset.resolution", "resolution"),
    "num_gpus": ("scaling.num_workers", "scaling.num_gpus", "num_workers", "num_gpus"),
    "text_tokens": ("data.max_text_tokens", "data.text_tokens", "plan.text_tokens"),
    "gpu": ("plan.gpu", "scaling.gpu_type", "gpu"),
    "gpu_memory_gib": ("plan.gpu_memory_gib", "gpu_memory_gib"),
    "text_encoder_resident": ("plan.text_encoder_resident", "text_encoder_resident"),
    "vae_resident": ("plan.vae_resident", "vae_resident"),
}
REQUIRED = ("zero_stage", "micro_batch", "num_gpus")


def _lookup(cfg: Any, dotted: str) -> tuple[bool, Any]:
    node = cfg
    for part in dotted.split("."):
        if isinstance(node, dict):
            if part not in node:
                return False, None
            node = node[part]
        elif hasattr(node, part):
            node = getattr(node, part)
        else:
            return False, None
    return True, node


def plan_from_train_config(cfg: Any, **overrides: Any):
    """The training job's dry-run hook: ``print(plan_from_train_config(cfg).table())``.

    Returns a ``MemoryPlan``; raises ConfigError for a value that is needed and not found, or an
    inconsistent combination (same messages as ``plan_memory``).
    """
    from twinflow.plan.memory import plan_memory

    found, model = _lookup(cfg, "model")
    if not found or not isinstance(model, ModelConfig):
        raise ConfigError("model: the memory plan needs a ModelConfig at cfg.model; call "
                          "twinflow.plan.plan_inputs_from_values(...) with plain values instead")
    found, tw = _lookup(cfg, "twinflow")
    if not found or not isinstance(tw, TwinFlowConfig):
        raise ConfigError("twinflow: the memory plan needs a TwinFlowConfig at cfg.twinflow")
    values: dict[str, Any] = {}
    for name, candidates in TRAIN_CONFIG_FIELDS.items():
        if name in overrides:
            values[name] = overrides.pop(name)
            continue
        for dotted in candidates:
            ok, value = _lookup(cfg, dotted)
            if ok and value is not None:
                values[name] = value
                break
        else:
            if name in REQUIRED:
                raise ConfigError(f"{candidates[0]}: the memory plan needs {name} and found none of "
                                  f"{', '.join(candidates)}; pass {name}=... to plan_from_train_config")
    if isinstance(values.get("resolution"), (list, tuple)):
        values["resolution"] = tuple(values["resolution"])
    return plan_memory(plan_inputs_from_values(model, tw, **values, **overrides))
