"""Conditioning and latents from pixels and captions, for pre-caching and raw-data training, in any family.

Only the VAE, text encoder and tokenizer are loaded: the family's diffusers pipeline
``from_pretrained(path, transformer=None, scheduler=None)`` skips the transformer entirely (diffusers
leaves a component that is passed as None unloaded). Prompts and images go through the family's own
encoding (models/backbone.py; Qwen-Image: ``pipe.encode_prompt`` with its chat template, posterior-mean
latents normalised per channel, docs/DESIGN.md "Qwen-Image condition"; SANA: its complex human
instruction, DC-AE latents × scaling factor) — the same code generation uses; this class owns loading the
frozen parts once per actor/worker. Used by the precache actors and, for small models, in-process by Train
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


class PipelineEncoder:
    """The frozen VAE + text encoder of a pipeline folder (or hub id) of any family (``family``: auto reads
    it from the folder, models/families.py)."""

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto", max_sequence_length: int = 512,
                 load_vae: bool = True, load_text: bool = True, family: str = "auto"):
        from twinflow.models.families import backbone_for

        self.backbone = backbone_for(str(model_path), family)
        self.device = resolve_device(device)
        self.dtype = torch_dtype(dtype, self.device)  # auto: bf16 on GPU (as the reference runs them), else fp32
        self.max_sequence_length = max_sequence_length
        self.pipe = self.backbone.load_encoding_pipeline(model_path, dtype=self.dtype, load_vae=load_vae,
                                                         load_text=load_text)
        self.pipe.to(self.device)
        self.model_path = str(model_path)
        if load_vae:
            self.pipe.vae.eval().requires_grad_(False)
        if load_text:
            self.pipe.text_encoder.eval().requires_grad_(False)

    # ------------------------------------------------------------------ images

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] in [-1, 1] -> the family's normalised latents float32 [B, C, h, w]."""
        return self.backbone.encode_images(self.pipe.vae, pixels)

    # ------------------------------------------------------------------ prompts

    @torch.inference_mode()
    def encode_prompts(self, texts: list[str]) -> list[torch.Tensor]:
        """Per prompt, its float32 [L_i, D] embedding without padding (L_i = valid tokens)."""
        cond = self.backbone.encode_prompts(self.pipe, list(texts), self.max_sequence_length, device=self.device)
        rows = qwen_encode.split_prompt_embeds(cond)
        empty = [t for t, r in zip(texts, rows) if r.shape[0] == 0]
        if empty:  # a condition of no tokens would fail deep inside the transformer's cross-attention
            raise ValueError(f"{self.model_path}: the prompt {empty[0]!r} encodes to no tokens with this model's "
                             f"tokenizer; the tokenizer must add a start token, or the prompt must not be empty")
        return rows

    def uncond(self, prompt: str | None = None) -> dict[str, torch.Tensor]:
        """The unconditional condition (``prompt``; None: the family's ∅): {"prompt_embeds": [1, L, D] float32,
        "prompt_mask": [1, L] int64}."""
        return pad_prompts(self.encode_prompts([self.backbone.uncond_prompt if prompt is None else prompt]))

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
                   max_sequence_length: int = 512) -> PipelineEncoder:
    """One encoder per process and settings (Train workers iterate several epochs)."""
    return PipelineEncoder(model_path, device=device, dtype=dtype, max_sequence_length=max_sequence_length)
