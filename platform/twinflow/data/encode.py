"""Qwen-Image conditioning and latents from pixels and captions, for pre-caching and raw-data training.

Only the VAE, text encoder and tokenizer are loaded: ``QwenImagePipeline.from_pretrained(path,
transformer=None, scheduler=None)`` skips the 20B transformer entirely (diffusers leaves a
component that is passed as None unloaded). Prompts go through ``pipe.encode_prompt`` (chat
template, hidden state of the last layer, template tokens dropped); images through
``vae.encode(x).latent_dist.mean`` normalised as the Qwen-Image pipelines do:

    latents = (posterior_mean − latents_mean) / latents_std,   frame axis dropped -> [B, C, H/8, W/8]

(docs/DESIGN.md "Qwen-Image condition", docs/METHOD.md §16). The encoding itself is
twinflow.models.qwen_encode's (shared with generation); this class owns loading the frozen parts
once per actor/worker. Used by the precache actors and, for small models, in-process by Train
workers reading raw data.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from twinflow.data.config import UNCOND_PROMPT  # noqa: E402  (re-exported)
from twinflow.dtypes import torch_dtype
from twinflow.models import qwen_encode


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class QwenImageEncoder:
    """The frozen VAE + text encoder of a Qwen-Image pipeline folder (or hub id)."""

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto", max_sequence_length: int = 512,
                 load_vae: bool = True, load_text: bool = True):
        from diffusers import QwenImagePipeline

        self.device = resolve_device(device)
        self.dtype = torch_dtype(dtype, self.device)  # auto: bf16 on GPU (as the reference runs them), else fp32
        self.max_sequence_length = max_sequence_length
        skip = {"transformer": None, "scheduler": None}
        if not load_vae:
            skip["vae"] = None
        if not load_text:
            skip.update(text_encoder=None, tokenizer=None)
        self.pipe = QwenImagePipeline.from_pretrained(model_path, dtype=self.dtype, **skip)
        self.pipe.to(self.device)
        self.model_path = str(model_path)
        if load_vae:
            self.pipe.vae.eval().requires_grad_(False)
        if load_text:
            self.pipe.text_encoder.eval().requires_grad_(False)
            qwen_encode.skip_unused_logits(self.pipe.text_encoder)

    # ------------------------------------------------------------------ images

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] in [-1, 1] (H, W multiples of 16) -> normalised latents float32 [B, C, H/8, W/8]."""
        return qwen_encode.encode_images(self.pipe.vae, pixels)

    # ------------------------------------------------------------------ prompts

    @torch.inference_mode()
    def encode_prompts(self, texts: list[str]) -> list[torch.Tensor]:
        """Per prompt, its float32 [L_i, D] embedding without padding (L_i = valid tokens)."""
        cond = qwen_encode.encode_prompts(self.pipe, list(texts), self.max_sequence_length, device=self.device)
        return qwen_encode.split_prompt_embeds(cond)

    def uncond(self, prompt: str = UNCOND_PROMPT) -> dict[str, torch.Tensor]:
        """The unconditional condition: {"prompt_embeds": [1, L, D] float32, "prompt_mask": [1, L] int64}."""
        return pad_prompts(self.encode_prompts([prompt]))

    def training_batch(self, pixels: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
        """The training batch dict (docs/DESIGN.md "Training batch") from raw pixels and captions."""
        batch = pad_prompts(self.encode_prompts(texts))
        batch["latents"] = self.encode_images(pixels)
        return batch


def pad_prompts(embeds: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero-pad [L_i, D] embeddings to the longest: {"prompt_embeds": [B, L, D] float32, "prompt_mask": [B, L] int64}."""
    return qwen_encode.pad_prompt_embeds([e.cpu() for e in embeds], dtype=torch.float32)


@lru_cache(maxsize=2)
def cached_encoder(model_path: str, device: str = "auto", dtype: str = "auto",
                   max_sequence_length: int = 512) -> QwenImageEncoder:
    """One encoder per process and settings (Train workers iterate several epochs)."""
    return QwenImageEncoder(model_path, device=device, dtype=dtype, max_sequence_length=max_sequence_length)
