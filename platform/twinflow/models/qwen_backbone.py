"""Qwen-Image as a backbone (models/backbone.py): the contract over the family's own modules.

  qwen_image.py     the transformer + E2
  qwen_velocity.py  F(x_t, t, r, cond): 2×2 packing, img_shapes, the prompt mask as the pipeline passes it
  qwen_encode.py    prompts (chat template, "Generate an image." as ∅) and per-channel normalised latents
  pipeline.py       TwinFlowQwenImagePipeline
  tiny_qwen.py      random-weight pipeline folders for tests
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from twinflow.models.backbone import Backbone, PublishedConfig


class QwenImageBackbone(Backbone):
    name = "qwen-image"
    pipeline_class_names = ("QwenImagePipeline", "TwinFlowQwenImagePipeline")
    transformer_class_names = ("QwenImageTransformer2DModel", "TwinFlowQwenImageTransformer2DModel")
    uncond_prompt = "Generate an image."
    max_sequence_length = 512
    memory_planned = True

    @property
    def default_lora_targets(self) -> tuple[str, ...]:
        from twinflow.models.lora import QWEN_IMAGE_LORA_TARGETS

        return tuple(QWEN_IMAGE_LORA_TARGETS)

    def transformer_class(self) -> type:
        from twinflow.models.qwen_image import TwinFlowQwenImageTransformer2DModel

        return TwinFlowQwenImageTransformer2DModel

    def pipeline_class(self) -> type:
        from twinflow.models.pipeline import TwinFlowQwenImagePipeline

        return TwinFlowQwenImagePipeline

    def base_pipeline_class(self) -> type:
        from diffusers import QwenImagePipeline

        return QwenImagePipeline

    def vae_class(self) -> type:
        from diffusers import AutoencoderKLQwenImage

        return AutoencoderKLQwenImage

    def velocity(self, transformer):
        from twinflow.models.qwen_velocity import QwenImageVelocity

        return QwenImageVelocity(transformer)

    def latent_channels(self, transformer_config: dict) -> int:
        return int(transformer_config["in_channels"]) // 4  # 2×2 packing

    def text_pipeline(self, text_encoder, tokenizer):
        from twinflow.models.qwen_encode import text_encoding_pipeline

        return text_encoding_pipeline(text_encoder, tokenizer)

    def load_encoding_pipeline(self, path: str, dtype: torch.dtype | None = None, load_vae: bool = True,
                               load_text: bool = True, **kwargs):
        from twinflow.models.qwen_encode import skip_unused_logits

        pipe = super().load_encoding_pipeline(path, dtype, load_vae, load_text, **kwargs)
        skip_unused_logits(pipe.text_encoder)
        return pipe

    def encode_prompts(self, pipe, prompts: Sequence[str], max_sequence_length: int,
                       device: torch.device | str | None = None,
                       dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        from twinflow.models.qwen_encode import encode_prompts

        return encode_prompts(pipe, prompts, max_sequence_length, device=device, dtype=dtype)

    def vae_scale_factor(self, vae) -> int:
        from twinflow.models.qwen_encode import vae_scale_factor

        return vae_scale_factor(vae)

    def latent_grid(self, vae_config: dict, height: int, width: int) -> tuple[int, int]:
        f = 2 ** len(vae_config["temperal_downsample"])  # as QwenImagePipeline: even cells for 2×2 packing
        return 2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2))

    def encode_images(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        from twinflow.models.qwen_encode import encode_images

        return encode_images(vae, pixels)

    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        from twinflow.models.qwen_encode import decode_latents

        return decode_latents(vae, latents)

    def published_configs(self) -> dict[str, PublishedConfig]:
        from twinflow.models.qwen_image import QWEN_IMAGE_20B_CONFIG

        return {"qwen-image": PublishedConfig("Qwen/Qwen-Image", dict(QWEN_IMAGE_20B_CONFIG), "20B")}

    def build_tiny(self, path: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
        from twinflow.models.tiny_qwen import build_tiny_qwen_image

        return build_tiny_qwen_image(path, preset=preset, seed=seed)


QWEN_IMAGE = QwenImageBackbone()
