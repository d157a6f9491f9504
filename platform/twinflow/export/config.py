"""The export job's config (``jobs/export.py``): what to read, what to write, how to sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from twinflow.config.errors import require
from twinflow.dtypes import AUTO, DTYPE_NAMES
from twinflow.method.sampler import DEFAULT_STEPS, PRESET_STEPS

PIPELINE, LORA = "pipeline", "lora"
FORMATS = (PIPELINE, LORA)
_DTYPES = (AUTO, *DTYPE_NAMES)  # auto: as the run trained


@dataclass
class ExportConfig:
    source: str = ""
    """A training checkpoint (<run>/checkpoint_step_NNNNNNNN), a run's final/ folder, or a run folder
    (its final/ when finished, else its newest checkpoint)."""
    out: str = ""
    """Output folder; empty: <source>/export. An existing export there is replaced (or reused when it
    was made from the same source with the same settings)."""
    base_model: str = ""
    """The diffusers Qwen-Image folder or hub id the run trained on; empty: the run's model.path."""
    use_ema: bool = False
    """Export the EMA teacher's weights (LoRA-EMA adapter + E2 copy, or a full run's EMA module)
    instead of the online ones."""
    formats: list[str] = field(default_factory=lambda: [PIPELINE, LORA])
    """pipeline: a TwinFlowQwenImagePipeline folder (LoRA merged); lora: diffusers + ComfyUI LoRA files
    and the E2 weights (LoRA runs only; ignored for full runs)."""
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    """Pipeline weights dtype; auto: the run's model.dtype."""
    lora_dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    """LoRA / E2 file dtype; auto: as trained (model.lora.dtype)."""
    default_steps: int = DEFAULT_STEPS
    """NFE the exported pipeline samples with when num_inference_steps is not given (2: the released default)."""
    preset_steps: list[int] = field(default_factory=lambda: list(PRESET_STEPS))
    """NFE values saved as sampler presets (method/sampler.py few_step grids)."""
    overwrite: bool = False
    """Redo an export even when <out> already holds one of the same source and settings."""

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        require(bool(self.source), f"{p}source", "pass the checkpoint to export: --checkpoint <run>/checkpoint_step_…")
        require(len(self.formats) > 0 and all(f in FORMATS for f in self.formats), f"{p}formats",
                f"list some of {', '.join(FORMATS)}, got {self.formats}")
        require(self.dtype in _DTYPES, f"{p}dtype", f"must be one of {', '.join(_DTYPES)}")
        require(self.lora_dtype in _DTYPES, f"{p}lora_dtype", f"must be one of {', '.join(_DTYPES)}")
        require(self.default_steps >= 1, f"{p}default_steps", f"must be >= 1, got {self.default_steps}")
        require(len(self.preset_steps) > 0 and all(n >= 1 for n in self.preset_steps), f"{p}preset_steps",
                f"list NFE values >= 1, e.g. [1, 2, 4]; got {self.preset_steps}")


def default() -> ExportConfig:
    return ExportConfig()


PRESETS = {"default": default}
