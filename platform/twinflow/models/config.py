"""The model config: which checkpoint of which family, LoRA or full, precision, memory switches.

One dataclass, serialised as the ``model:`` section of the training YAML. The teacher *mode*
(self / ema / frozen) and its decay belong to the method config (``twinflow.teacher``,
``twinflow.teacher_ema_decay``); ``ema`` here only says whether the model must carry the LoRA
"ema" adapter, which has to exist before the optimizer and DeepSpeed wrap the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from twinflow.config.errors import require
from twinflow.dtypes import DTYPE_NAMES, torch_dtype
from twinflow.models.lora import LoraSettings

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(path: str) -> bool:
    """Whether ``path`` reads as a Hugging Face hub id (``owner/name``, e.g. Qwen/Qwen-Image) rather than
    a local path: the hub-id pattern, and not starting with ``.``, ``/`` or ``~``. Says nothing about
    whether the id exists; test the local folder first."""
    return _HUB_ID.match(path) is not None and not path.startswith((".", "/", "~"))


@dataclass
class ModelConfig:
    path: str = "Qwen/Qwen-Image"
    """A diffusers pipeline of a supported family: local folder or hub id (a TwinFlow export works too), or
    a name of twinflow.named that jobs build on first use: tiny / tiny-qwen / tiny-sana (random weights),
    digits-base (the miniature paper's pretrained digits base)."""
    family: str = "auto"
    """The model family (models/families.py: qwen-image, sana). auto: read from the folder's
    model_index.json (or a named model's); a hub id needs it named."""
    subfolder: str = "transformer"
    mode: Literal["lora", "full"] = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Used when mode is lora."""
    ema: bool = False
    """LoRA mode: add the "ema" adapter for ``twinflow.teacher: ema`` (full mode copies the module instead)."""
    gradient_checkpointing: bool = True
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    """Weights dtype of the transformer (the frozen base in LoRA mode; LoRA/E2 follow ``lora.dtype``)."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    def backbone(self):
        """The family implementation (models/backbone.py) of this model."""
        from twinflow.models.families import backbone_for

        return backbone_for(self.path, self.family)

    def lora_targets(self) -> list[str]:
        """``lora.targets``, or the family's default targets when it is empty."""
        return list(self.lora.targets) or list(self.backbone().default_lora_targets)

    def validate(self, path: str = "model") -> None:
        p = path or "model"
        require(bool(self.path), f"{p}.path", "set it to a diffusers pipeline folder or hub id (Qwen/Qwen-Image)")
        local = Path(self.path).expanduser()
        from twinflow.named import is_named_model

        if is_named_model(self.path) and not local.exists():
            pass  # a named model the job builds on first use (twinflow/named.py)
        elif local.exists():
            require(local.is_dir() and ((local / "model_index.json").exists()
                                        or (local / self.subfolder / "config.json").exists()),
                    f"{p}.path", f"{self.path} is not a diffusers pipeline folder (no model_index.json or "
                                 f"{self.subfolder}/config.json)")
        else:
            require(is_hub_id(self.path), f"{p}.path",
                    f"{self.path} does not exist locally and is not a hub id like Qwen/Qwen-Image")
        from twinflow.models.families import AUTO, FAMILIES

        require(self.family == AUTO or self.family in FAMILIES, f"{p}.family",
                f"unknown family {self.family!r}; choose one of {', '.join(FAMILIES)} or auto")
        if self.family == AUTO and local.exists():
            from twinflow.models.families import family_of_folder

            family_of_folder(local)  # a folder of no known family: one line naming its class, now
        require(self.mode in ("lora", "full"), f"{p}.mode", f"must be lora or full, got {self.mode!r}")
        require(self.dtype in DTYPE_NAMES, f"{p}.dtype", f"must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        require(not (self.ema and self.mode == "full"), f"{p}.ema",
                "only applies to mode lora (full mode's EMA teacher is a module copy); set it to false")
        if self.mode == "lora":
            self.lora.validate(f"{p}.lora")
