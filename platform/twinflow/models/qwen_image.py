"""Qwen-Image as TwinFlow's velocity network F(x_t, t, r, cond) (docs/METHOD.md §2, §3.1).

Two pieces:

``TwinFlowQwenImageTransformer2DModel``
    diffusers' ``QwenImageTransformer2DModel`` plus a second timestep embedder
    ``time_text_embed_2`` (E2) for the target time r, so that

        temb = E1(t) + (t − r)·E2(r)        (per sample; the post-2026-01-07 rule)

    E1 is the pretrained ``time_text_embed`` fed the raw signed t ∈ [−1, 1] (its sinusoid scales
    by 1000, exactly as the Qwen pipeline feeds σ ∈ [0, 1]); E2 is copy-initialised from E1.
    diffusers' forward is not forked: a forward hook on ``time_text_embed`` adds the E2 term, and
    ``forward`` only takes one extra keyword, ``target_timestep``. Called without it (as the stock
    ``QwenImagePipeline`` does) r = t and the model is the pretrained one. The flag
    ``target_time_embed`` is a registered config field, so ``save_pretrained``/``from_pretrained``
    round-trip E2; loading a plain Qwen-Image checkpoint copy-initialises E2 from E1 and logs it.

The rest of the Qwen-Image family lives beside it:
  qwen_velocity.py  ``QwenImageVelocity``, the method's F over this model (latent packing, img_shapes)
  loading.py        building (random weights from a config) and loading (diffusers' from_pretrained,
                    or module-by-module streaming into a ZeRO-3 partitioned model), ready to train
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.configuration_utils import register_to_config
# Imported for diffusers' component loader, not used here: a pipeline folder names this module as
# the transformer's library, and diffusers finds the load method by looking up ``ModelMixin``
# *in that module* (pipeline_loading_utils.get_class_obj_and_candidates).
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.models.transformers.transformer_qwenimage import QwenTimestepProjEmbeddings
from torch import nn

from twinflow.models.target_time import E2_PREFIX, TargetTimeMixin  # noqa: F401  (E2_PREFIX re-exported)

logger = logging.getLogger(__name__)


# The released Qwen/Qwen-Image transformer (transformer/config.json on the hub; the same numbers
# are diffusers' constructor defaults): 60 dual-stream blocks, 24 heads × 128 = 3072 wide, text
# from Qwen2.5-VL-7B (3584), 16-channel VAE latents packed 2×2 (64 in), RoPE axes 16/56/56.
QWEN_IMAGE_20B_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}


class TwinFlowQwenImageTransformer2DModel(TargetTimeMixin, QwenImageTransformer2DModel):
    """Qwen-Image transformer with TwinFlow's target-time embedder E2 (see the module docstring)."""

    E1_PATH = "time_text_embed"
    time_scale = 1.0  # the Qwen-Image pipeline feeds σ ∈ [0, 1]; its embedder scales by 1000 itself

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 64,
        out_channels: int | None = 16,
        num_layers: int = 60,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 3584,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        zero_cond_t: bool = False,
        use_additional_t_cond: bool = False,
        use_layer3d_rope: bool = False,
        target_time_embed: bool = True,
    ):
        super().__init__(patch_size=patch_size, in_channels=in_channels, out_channels=out_channels,
                         num_layers=num_layers, attention_head_dim=attention_head_dim,
                         num_attention_heads=num_attention_heads, joint_attention_dim=joint_attention_dim,
                         guidance_embeds=guidance_embeds, axes_dims_rope=axes_dims_rope, zero_cond_t=zero_cond_t,
                         use_additional_t_cond=use_additional_t_cond, use_layer3d_rope=use_layer3d_rope)
        self._init_target_time(target_time_embed)

    def make_target_embedder(self) -> nn.Module:
        # E2 never gets the Layered model's additional-t embedding: it embeds r only.
        return QwenTimestepProjEmbeddings(embedding_dim=self.inner_dim)

    def embed_target(self, e2: nn.Module, r_raw: torch.Tensor, e1_args: tuple, e1_kwargs: dict):
        t_cast = e1_args[0] if e1_args else e1_kwargs["timestep"]
        hidden_states = e1_args[1] if len(e1_args) > 1 else e1_kwargs["hidden_states"]
        n = r_raw.shape[0]
        r = r_raw.to(device=t_cast.device, dtype=t_cast.dtype)  # embedded exactly as E1 embeds t
        extra = t_cast.shape[0] - n  # zero_cond_t (edit models) doubles the batch with t = 0 rows
        if extra:
            r = torch.cat([r, t_cast[n:]])
        # E2 may be kept in fp32 next to a bf16 base (LoRA mode); it only reads the dtype hint.
        e2_dtype = e2.timestep_embedder.linear_1.weight.dtype
        return e2(r, hidden_states[:0].to(e2_dtype)), extra

    def forward(self, *args, target_timestep: torch.Tensor | None = None, **kwargs):
        """diffusers' forward plus ``target_timestep`` r [B] (None: r = t, the pretrained model)."""
        t = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        return self._run_with_target(t, target_timestep, lambda: super(TargetTimeMixin, self).forward(*args, **kwargs))
