"""``QwenImageVelocity``: the method's F(x_t, t, r, cond) over the TwinFlow Qwen-Image transformer.

Normalised VAE latents [B, C, H, W] in, average velocity [B, C, H, W] out. It packs 2×2 patches and
builds ``img_shapes`` with the pipeline's own static helpers, and passes the prompt mask the way the
pipeline does (None when full), so the transformer sees exactly what ``QwenImagePipeline`` feeds it.
"""

from __future__ import annotations

from typing import Iterable

import torch
from diffusers import QwenImagePipeline
from torch import nn

from twinflow.models.qwen_image import TwinFlowQwenImageTransformer2DModel


# ---------------------------------------------------------------------------
# the velocity network F(x_t, t, r, cond)
# ---------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/2)·(W/2), 4C]: the pipeline's 2×2 patch packing."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even for 2×2 packing, got {h}×{w}")
    return QwenImagePipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for a latent grid of ``height`` × ``width``."""
    # The pipeline's helper takes *pixel* sizes and a VAE factor; factor 1 makes them latent sizes.
    return QwenImagePipeline._unpack_latents(packed, height, width, 1)[:, :, 0]


def image_shapes(batch: int, height: int, width: int) -> list[list[tuple[int, int, int]]]:
    """``img_shapes`` for a latent grid of ``height`` × ``width``: one (frame, rows, cols) per sample."""
    return [[(1, height // 2, width // 2)]] * batch


class QwenImageVelocity(nn.Module):
    """TwinFlow's F(x_t, t, r, cond) over a ``TwinFlowQwenImageTransformer2DModel``.

    x_t     normalised VAE latents [B, C, H, W] (H, W even)
    t, r    [B] signed times in [−1, 1]
    cond    {"prompt_embeds": [B, L, D], "prompt_mask": [B, L]} (mask optional)
    returns the average velocity over [r, t], [B, C, H, W], in x_t's dtype.
    Inputs are cast to the transformer's compute dtype (that of ``img_in``).
    """

    def __init__(self, transformer: TwinFlowQwenImageTransformer2DModel):
        super().__init__()
        if transformer.config.patch_size != 2:
            raise ValueError("Qwen-Image packs 2×2 patches; patch_size must be 2, got "
                             f"{transformer.config.patch_size}")
        self.transformer = transformer

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.transformer.img_in.weight.dtype

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: dict) -> torch.Tensor:
        b, _, h, w = x_t.shape
        dtype = self.compute_dtype
        embeds = cond["prompt_embeds"].to(dtype)
        mask = cond.get("prompt_mask")
        if mask is not None and bool(mask.all()):
            mask = None  # the pipeline passes None for an all-valid batch (encode_prompt)
        out = self.transformer(hidden_states=pack_latents(x_t.to(dtype)), encoder_hidden_states=embeds,
                               encoder_hidden_states_mask=mask, timestep=t.reshape(b), target_timestep=r.reshape(b),
                               img_shapes=image_shapes(b, h, w), return_dict=False)[0]
        return unpack_latents(out, h, w).to(x_t.dtype)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def parameter_count(module: nn.Module, names: Iterable[str] | None = None) -> int:
    """Total parameter count (works on meta models); ``names`` restricts to those prefixes."""
    prefixes = tuple(names) if names else None
    return sum(p.numel() for n, p in module.named_parameters() if prefixes is None or n.startswith(prefixes))
