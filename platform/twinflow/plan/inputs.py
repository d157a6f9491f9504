"""What the memory planner needs to know: one typed config (``PlanInputs``), and GPU sizes.

``model`` and ``twinflow`` are the training job's own sections (``ModelConfig``,
``TwinFlowConfig``), so a training config maps onto this one field for field (presets.py). The
transformer's architecture comes from ``architecture`` when given, else from ``model.path``:
``Qwen/Qwen-Image`` is known without a download (``QWEN_IMAGE_20B_CONFIG``); a local pipeline
folder is read from its ``transformer/config.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from twinflow.config.errors import ConfigError, require
from twinflow.method.config import TwinFlowConfig, twinflow
from twinflow.models.config import ModelConfig

MIB = 1024**2
GIB = 1024**3

# Total device memory as nvidia-smi reports it (MiB). The H100/H200 figures are the lent machines'
# own readings (/work/.library/device/KINDS.md); the others are the vendors' nominal sizes.
GPU_MEMORY: dict[str, int] = {
    "h100": 81559 * MIB,
    "h200": 143771 * MIB,
    "a100-80g": 81920 * MIB,
    "a100-40g": 40960 * MIB,
    "l40s": 46068 * MIB,
    "rtx4090": 24564 * MIB,
}
# Memory outside PyTorch's allocator on a CUDA device: the CUDA context, cuBLAS/cuDNN workspaces
# and kernels' module images (≈ 0.5–0.8 GiB on Hopper with CUDA 12/13; the upper end is used).
CUDA_CONTEXT_BYTES = int(0.8 * GIB)
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class CommBuffers:
    """DeepSpeed's communication buffers (its defaults; set what the training job sets)."""

    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool | None = None
    """None: DeepSpeed's default (on for stage 3 only). DeepSpeed documents ~4.5× bucket memory when on."""
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_prefetch_bucket_size: int = 50_000_000

    def validate(self, path: str = "buffers") -> None:
        for name in ("reduce_bucket_size", "allgather_bucket_size", "stage3_max_live_parameters",
                     "stage3_prefetch_bucket_size"):
            require(getattr(self, name) >= 0, f"{path}.{name}", "must be >= 0 (elements)")


@dataclass
class PlanInputs:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Checkpoint, lora/full, LoRA rank/targets/dtype, weights dtype, gradient checkpointing."""
    architecture: dict[str, Any] | None = None
    """Transformer config.json values; None: resolved from ``model.path``."""
    twinflow: TwinFlowConfig = field(default_factory=twinflow)
    """The objective (block mix → forwards per step) and the teacher (self/ema/frozen)."""

    # --- parallelism (DeepSpeed) ---------------------------------------------------------------
    num_gpus: int = 1
    zero_stage: int = 2
    offload_optimizer: bool = False
    """ZeRO-Offload: fp32 master weights, Adam moments (and the fp32 gradient copy) live in host RAM."""
    offload_params: bool = False
    """ZeRO-3 only: the 16-bit parameter partitions live in host RAM; only gathered ones are on GPU."""
    micro_batch: int = 4
    grad_accum: int = 1
    buffers: CommBuffers = field(default_factory=CommBuffers)

    # --- data ------------------------------------------------------------------------------------
    height: int = 512
    width: int = 512
    text_tokens: int = 256
    """Prompt length after the pipeline drops its template (Qwen-Image: up to 512+; most prompts < 200)."""
    latent_channels: int = 16

    # --- what else is on the GPU ---------------------------------------------------------------
    text_encoder_resident: bool = False
    """Qwen2.5-VL-7B in the training process (False: prompts pre-cached, the platform's default)."""
    vae_resident: bool = False
    """The VAE in the training process (False: latents pre-cached)."""
    method: Literal["twinflow", "dmd"] = "twinflow"
    """dmd: the DMD-style comparison — a second trained copy (fake score) and a frozen teacher copy."""

    # --- the GPU -------------------------------------------------------------------------------
    gpu: str = "h100"
    """A name from ``GPU_MEMORY`` or "custom" (then set ``gpu_memory_gib``)."""
    gpu_memory_gib: float | None = None
    margin: float = 0.10
    """Required headroom as a fraction of the device (fragmentation, allocator caching, spikes)."""

    # --- derived ---------------------------------------------------------------------------------

    @property
    def image_tokens(self) -> int:
        """VAE /8, then 2×2 patches: (H/16)·(W/16)."""
        return (self.height // 16) * (self.width // 16)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.latent_channels, self.height // 8, self.width // 8

    @property
    def gpu_bytes(self) -> int:
        if self.gpu == "custom":
            return int((self.gpu_memory_gib or 0) * GIB)
        return GPU_MEMORY[self.gpu]

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.model.dtype]

    @property
    def lora_bytes(self) -> int:
        return _DTYPE_BYTES[self.model.lora.dtype]

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        require(self.num_gpus >= 1, f"{p}num_gpus", f"must be >= 1, got {self.num_gpus}")
        require(self.zero_stage in (0, 1, 2, 3), f"{p}zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        require(not self.offload_params or self.zero_stage == 3, f"{p}offload_params",
                "parameter offload needs zero_stage 3 (DeepSpeed partitions parameters only there)")
        require(not self.offload_optimizer or self.zero_stage >= 1, f"{p}offload_optimizer",
                "optimizer offload needs zero_stage >= 1")
        require(self.micro_batch >= 1, f"{p}micro_batch", f"must be >= 1, got {self.micro_batch}")
        require(self.grad_accum >= 1, f"{p}grad_accum", f"must be >= 1, got {self.grad_accum}")
        for name in ("height", "width"):
            v = getattr(self, name)
            require(v >= 16 and v % 16 == 0, f"{p}{name}",
                    f"must be a positive multiple of 16 (VAE /8, then 2×2 patches), got {v}")
        require(self.text_tokens >= 1, f"{p}text_tokens", f"must be >= 1, got {self.text_tokens}")
        require(self.latent_channels >= 1, f"{p}latent_channels", "must be >= 1")
        require(self.gpu == "custom" or self.gpu in GPU_MEMORY, f"{p}gpu",
                f"unknown GPU {self.gpu!r}; use one of {', '.join(GPU_MEMORY)} or custom (with gpu_memory_gib)")
        require(self.gpu != "custom" or (self.gpu_memory_gib or 0) > 0, f"{p}gpu_memory_gib",
                "set the device memory in GiB for gpu: custom")
        require(0 <= self.margin < 1, f"{p}margin", f"must be in [0, 1), got {self.margin}")
        require(self.method in ("twinflow", "dmd"), f"{p}method", "must be twinflow or dmd")
        if self.model.mode == "lora":
            self.model.lora.validate(f"{p}model.lora")


def resolve_architecture(inputs: PlanInputs) -> dict[str, Any]:
    """The transformer config dict to count and plan with (see the module docstring); its ``_class_name``
    is kept, so that the count builds the model's own family (models/families.py)."""
    from twinflow.models.families import all_backbones, published

    if inputs.architecture:
        return dict(inputs.architecture)
    path = inputs.model.path
    local = Path(path).expanduser()
    if local.is_dir():
        for candidate in (local / (inputs.model.subfolder or "") / "config.json", local / "config.json"):
            if candidate.is_file():
                data = json.loads(candidate.read_text())
                return {k: v for k, v in data.items() if not k.startswith("_") or k == "_class_name"}
        raise ConfigError(f"model.path: {path} has no {inputs.model.subfolder}/config.json to read the transformer "
                          "architecture from")
    known_here = published(path)
    if known_here is not None:
        family, config = known_here
        return {"_class_name": family.transformer_class_names[0], **config.transformer}
    known = [c.hub_id for b in all_backbones() for c in b.published_configs().values()]
    raise ConfigError(f"model.path: cannot plan {path!r} without its config; use a local pipeline folder, "
                      f"{', '.join(known)}, or set architecture: {{...}} (transformer config.json)")
