"""The backbone contract: what the method, the trainer, export, the planner, the pipeline and the evals
need from a model family. Qwen-Image (models/qwen_backbone.py) and SANA (models/sana.py) implement it;
``models/families.py`` maps a ``model.family`` name, or a diffusers folder, to its implementation.

A family is a diffusers text-to-image model whose transformer predicts the flow velocity v = z − x on the
path x_t = t·z + (1 − t)·x. What each implementation provides:

  classes      its TwinFlow transformer (the diffusers class + E2, models/target_time.py), its any-step
               pipeline (a subclass of the family's diffusers pipeline), the diffusers pipeline and VAE
  velocity     ``velocity(transformer)``: the method's F(x_t, t, r, cond) on normalised latents [B, C, h, w]
               (packing, timestep scaling and the condition's keyword names are the family's business)
  encode side  the text pipeline's prompt encoding into {"prompt_embeds", "prompt_mask"}, the
               unconditional prompt, pixels ↔ normalised latents through the family's VAE
  LoRA         the default target modules
  planner      the published configurations with their parameter counts
  tests        ``build_tiny``: a random-weight pipeline folder from configs, in seconds

Everything else — loading with streaming init (whole on CPU, or partitioned under ZeRO-3), the
TwinFlow objective, DeepSpeed, checkpoints, export, the eval pool — is family-independent and lives
once, outside the families.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class PublishedConfig:
    """A released checkpoint's transformer config and its published size as the model card states it
    ("20B", "0.6B"): the planner's meta-device count must round to it."""

    hub_id: str
    transformer: dict[str, Any]
    published_size: str

    @property
    def published_params(self) -> float:
        return float(self.published_size.rstrip("B")) * 1e9

    @property
    def rounding(self) -> float:
        """Half a unit of the published figure's last digit: how far a count may be and still round to it."""
        digits = self.published_size.rstrip("B")
        decimals = len(digits.split(".")[1]) if "." in digits else 0
        return 0.5 * 10 ** -decimals * 1e9


class Backbone:
    """One model family (see the module docstring). Subclasses set the class attributes and implement the
    methods that raise NotImplementedError; classes are imported lazily so that naming a family costs nothing."""

    name: str = ""
    pipeline_class_names: tuple[str, ...] = ()
    """``_class_name`` values in model_index.json that are this family (diffusers' and ours)."""
    transformer_class_names: tuple[str, ...] = ()
    """``_class_name`` values in transformer/config.json that are this family."""
    default_lora_targets: tuple[str, ...] = ()
    uncond_prompt: str = ""
    """The unconditional condition ∅ of CFG and condition dropout (docs/METHOD.md §6)."""
    max_sequence_length: int = 512
    memory_planned: bool = False
    """Whether the memory planner's activation model (plan/activations.py) covers this family's blocks."""

    # ---- classes -----------------------------------------------------------------------------------

    def transformer_class(self) -> type:
        raise NotImplementedError

    def pipeline_class(self) -> type:
        """The TwinFlow any-step pipeline (``from_pretrained`` also takes a plain folder of the family)."""
        raise NotImplementedError

    def base_pipeline_class(self) -> type:
        """diffusers' own pipeline of the family (used to load only the VAE and text side)."""
        raise NotImplementedError

    def vae_class(self) -> type:
        raise NotImplementedError

    # ---- the velocity network ------------------------------------------------------------------------

    def velocity(self, transformer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def latent_channels(self, transformer_config: dict) -> int:
        """Channels of the normalised latents the velocity takes."""
        raise NotImplementedError

    # ---- the encode side -----------------------------------------------------------------------------

    def text_pipeline(self, text_encoder, tokenizer):
        """A family pipeline holding only the text side, for ``encode_prompts``."""
        raise NotImplementedError

    def encode_prompts(self, pipe, prompts: Sequence[str], max_sequence_length: int,
                       device: torch.device | str | None = None,
                       dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """Prompts → {"prompt_embeds": [B, L, D], "prompt_mask": [B, L] int64} as the family's pipeline
        encodes them for generation (its own template and truncation), padding after the valid tokens."""
        raise NotImplementedError

    def vae_scale_factor(self, vae) -> int:
        raise NotImplementedError

    def latent_grid(self, vae_config: dict, height: int, width: int) -> tuple[int, int]:
        """The latent grid (h, w) the family's pipeline samples for an image of ``height`` × ``width``."""
        raise NotImplementedError

    def encode_images(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] in [−1, 1] → normalised latents [B, C, h, w] float32."""
        raise NotImplementedError

    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, h, w] → images [B, 3, H, W] float32 in [0, 1]."""
        raise NotImplementedError

    # ---- planner and tests ---------------------------------------------------------------------------

    def published_configs(self) -> dict[str, PublishedConfig]:
        raise NotImplementedError

    def build_tiny(self, path: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
        raise NotImplementedError

    # ---- family-independent, built on the above ----------------------------------------------------

    def load_encoding_pipeline(self, path: str, dtype: torch.dtype | None = None, load_vae: bool = True,
                               load_text: bool = True, **kwargs):
        """The family's diffusers pipeline with only the VAE and/or the text side loaded (the transformer,
        tens of GB at real size, is never read)."""
        skip: dict[str, Any] = {"transformer": None, "scheduler": None}
        if not load_vae:
            skip["vae"] = None
        if not load_text:
            skip.update(text_encoder=None, tokenizer=None)
        return self.base_pipeline_class().from_pretrained(path, dtype=dtype, **skip, **kwargs)

    def __repr__(self) -> str:
        return f"<backbone {self.name}>"
