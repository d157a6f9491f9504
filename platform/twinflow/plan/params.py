"""Exact parameter counts, from models built on the meta device (no weights, no memory).

The transformer is built with ``build_twinflow_transformer(config, init_context=init_empty_weights())``
— the same class the training job trains, target-time embedder E2 included — and counted module
by module. LoRA parameters are counted from the linear layers PEFT would wrap (``resolve_targets``,
E2 excluded as ``add_lora`` excludes it): each wrapped ``nn.Linear(in, out)`` gets
``lora_A: rank × in`` and ``lora_B: out × rank`` (no biases). The text encoder (Qwen2.5-VL-7B)
and the VAE are built the same way from their published configs, for the "resident" case.

Counts are cached per config: building the 20B transformer on meta takes about half a second,
the 8B text encoder about as long.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from torch import nn

# Qwen/Qwen-Image text_encoder/config.json = Qwen2.5-VL-7B-Instruct's architecture (published values).
QWEN25_VL_7B_TEXT = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                     "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                     "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
                     "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"}}
QWEN25_VL_7B_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                       "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "in_channels": 3}


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of one TwinFlow Qwen-Image transformer (E2 included in ``total``)."""

    total: int
    blocks: int
    """All dual-stream blocks together."""
    per_block: int
    e2: int
    """The target-time embedder ``time_text_embed_2`` (0 when the config disables it)."""
    lora: int
    """Parameters of one LoRA adapter with the given rank/targets (0 when none was asked for)."""
    lora_layers: int
    """Linear layers that adapter wraps."""

    @property
    def outside_blocks(self) -> int:
        return self.total - self.blocks

    def to_dict(self) -> dict[str, int]:
        return {"total": self.total, "blocks": self.blocks, "per_block": self.per_block, "e2": self.e2,
                "outside_blocks": self.outside_blocks, "lora": self.lora, "lora_layers": self.lora_layers}


def meta_transformer(architecture: dict[str, Any]) -> nn.Module:
    """The TwinFlow transformer of ``architecture`` on the meta device."""
    from accelerate import init_empty_weights

    from twinflow.models.loading import build_twinflow_transformer

    return build_twinflow_transformer(dict(architecture), init_context=init_empty_weights())


def count_parameters(architecture: dict[str, Any], lora_rank: int | None = None,
                     lora_targets: tuple[str, ...] | list[str] = ()) -> ParamCounts:
    """Exact counts for a transformer config (``QWEN_IMAGE_20B_CONFIG`` or a config.json dict).

    ``lora_rank``/``lora_targets``: also count one LoRA adapter (ConfigError for a target that
    matches no linear layer, as ``add_lora`` would raise).
    """
    key = json.dumps(_jsonable(architecture), sort_keys=True)
    return _count(key, lora_rank, tuple(lora_targets))


@functools.lru_cache(maxsize=32)
def _count(key: str, lora_rank: int | None, lora_targets: tuple[str, ...]) -> ParamCounts:
    from twinflow.models.lora import LoraSettings, resolve_targets

    model = meta_transformer(json.loads(key))
    total = sum(p.numel() for p in model.parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.transformer_blocks]
    e2 = getattr(model, "time_text_embed_2", None)
    lora = layers = 0
    if lora_rank:
        targets = LoraSettings(targets=list(lora_targets)).for_transformer(model).targets  # empty: the family's
        found = resolve_targets(model, targets)
        modules = dict(model.named_modules())
        wrapped = sorted({name for names in found.values() for name in names})
        for name in wrapped:
            linear = modules[name]
            lora += lora_rank * (linear.in_features + linear.out_features)
        layers = len(wrapped)
    return ParamCounts(total=total, blocks=sum(blocks), per_block=max(blocks) if blocks else 0,
                       e2=sum(p.numel() for p in e2.parameters()) if e2 is not None else 0, lora=lora,
                       lora_layers=layers)


@functools.lru_cache(maxsize=1)
def text_encoder_parameters() -> int:
    """Qwen2.5-VL-7B (Qwen-Image's text encoder, vision tower and LM head included), built on meta."""
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(text_config=dict(QWEN25_VL_7B_TEXT), vision_config=dict(QWEN25_VL_7B_VISION),
                              vision_start_token_id=151652, vision_end_token_id=151653, vision_token_id=151654,
                              image_token_id=151655, video_token_id=151656, tie_word_embeddings=False)
    with init_empty_weights():
        model = Qwen2_5_VLForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=1)
def vae_parameters() -> int:
    """Qwen-Image's VAE (``AutoencoderKLQwenImage``'s defaults are the released config), built on meta."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage

    with init_empty_weights():
        vae = AutoencoderKLQwenImage()
    return sum(p.numel() for p in vae.parameters())


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
