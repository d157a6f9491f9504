"""The encode side of Qwen-Image: prompts → condition, pixels ↔ normalised latents.

These are what the latent pre-caching job, the trainer and the pipeline share, so that a cached
batch, a training batch and a generation all see the same tensors (docs/DESIGN.md,
"Qwen-Image condition"):

  cond     {"prompt_embeds": [B, L, D] float32, "prompt_mask": [B, L] int64} from
           ``QwenImagePipeline.encode_prompt`` (template, drop of the system prefix, padding to the
           longest prompt, truncation to ``max_sequence_length`` — all diffusers' own code).
  uncond   the prompt ``UNCOND_PROMPT`` = "Generate an image." encoded the same way (docs/METHOD.md §6:
           the reference's ∅ is this prompt, not an empty one).
  latents  ``(z − latents_mean) / latents_std`` of the VAE posterior *mean*, frame axis dropped,
           [B, 16, H/8, W/8] for the real VAE.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

UNCOND_PROMPT = "Generate an image."
MAX_SEQUENCE_LENGTH = 1024  # QwenImagePipeline.check_inputs refuses more


# ---------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------


def skip_unused_logits(text_encoder):
    """Make the text encoder compute language-model logits for the last token only.

    ``QwenImagePipeline.encode_prompt`` reads hidden states, but calls the full causal LM, whose head
    maps every token to 152k vocabulary logits: for 512 tokens that is ~310 MB of fp32 per prompt and
    most of the encoder's time at small widths (45× faster for the tiny one; identical embeddings).
    A forward pre-hook passes ``logits_to_keep=1``; idempotent; returns the encoder."""
    if text_encoder is not None and not getattr(text_encoder, "_twinflow_last_logits", False):
        text_encoder.register_forward_pre_hook(lambda module, args, kwargs: (args, {**kwargs, "logits_to_keep": 1}),
                                               with_kwargs=True)
        text_encoder._twinflow_last_logits = True
    return text_encoder


def text_encoding_pipeline(text_encoder, tokenizer):
    """A ``QwenImagePipeline`` holding only the text side, for ``encode_prompts``."""
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(scheduler=None, vae=None, text_encoder=skip_unused_logits(text_encoder),
                             tokenizer=tokenizer, transformer=None)


def load_text_encoding_pipeline(path_or_hub_id: str, torch_dtype: torch.dtype | None = None, **kwargs):
    """Load only text_encoder + tokenizer of a Qwen-Image pipeline folder or hub id."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(path_or_hub_id, transformer=None, vae=None, dtype=torch_dtype, **kwargs)
    skip_unused_logits(pipe.text_encoder)
    return pipe


def _as_pipeline(pipe_or_components: Any):
    if hasattr(pipe_or_components, "encode_prompt"):
        return pipe_or_components
    if isinstance(pipe_or_components, (tuple, list)) and len(pipe_or_components) == 2:
        return text_encoding_pipeline(*pipe_or_components)
    if isinstance(pipe_or_components, dict):
        return text_encoding_pipeline(pipe_or_components["text_encoder"], pipe_or_components["tokenizer"])
    raise TypeError("pass a Qwen-Image pipeline or (text_encoder, tokenizer); got "
                    f"{type(pipe_or_components).__name__}")


@torch.no_grad()
def encode_prompts(pipe_or_components: Any, prompts: str | Sequence[str], max_sequence_length: int = 512,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = torch.float32
                   ) -> dict[str, torch.Tensor]:
    """Prompts → {"prompt_embeds": [B, L, D], "prompt_mask": [B, L] int64}, L = longest prompt.

    ``pipe_or_components``: a (TwinFlow)QwenImagePipeline, or (text_encoder, tokenizer).
    ``dtype`` casts the embeddings (float32 by the training-batch contract; None keeps the text
    encoder's dtype). The mask is always returned (all ones when nothing is padded).
    """
    if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise ValueError(f"max_sequence_length must be in [1, {MAX_SEQUENCE_LENGTH}], got {max_sequence_length}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts to encode")
    pipe = _as_pipeline(pipe_or_components)
    embeds, mask = pipe.encode_prompt(prompt=prompts, device=device, max_sequence_length=max_sequence_length)
    if mask is None:  # encode_prompt drops an all-ones mask
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    if dtype is not None:
        embeds = embeds.to(dtype)
    return {"prompt_embeds": embeds, "prompt_mask": mask.to(torch.long)}


def uncond_condition(pipe_or_components: Any, batch_size: int, max_sequence_length: int = 512,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = torch.float32
                     ) -> dict[str, torch.Tensor]:
    """The unconditional condition ("Generate an image.") repeated to ``batch_size`` rows."""
    one = encode_prompts(pipe_or_components, [UNCOND_PROMPT], max_sequence_length, device=device, dtype=dtype)
    return expand_condition(one, batch_size)


def expand_condition(cond: dict[str, torch.Tensor], batch_size: int) -> dict[str, torch.Tensor]:
    """A one-row condition repeated to ``batch_size`` rows (a view: no copy)."""
    for k, v in cond.items():
        if v.shape[0] != 1:
            raise ValueError(f"expand_condition needs a one-row condition; {k} has {v.shape[0]} rows")
    return {k: v.expand(batch_size, *v.shape[1:]) for k, v in cond.items()}


def split_prompt_embeds(cond: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per-sample embeddings without padding, [L_i, D] each (what a cache stores per row)."""
    embeds, mask = cond["prompt_embeds"], cond["prompt_mask"]
    # Masks from encode_prompt are contiguous: valid tokens first, then padding.
    return [e[: int(m.sum())] for e, m in zip(embeds, mask)]


def pad_prompt_embeds(rows: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Collate per-sample [L_i, D] embeddings into a condition padded to the longest (zeros, mask 0)."""
    if not rows:
        raise ValueError("no prompt embeddings to collate")
    length = max(int(r.shape[0]) for r in rows)
    dim = int(rows[0].shape[1])
    out_dtype = dtype or rows[0].dtype
    embeds = torch.zeros(len(rows), length, dim, dtype=out_dtype)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        if r.dim() != 2 or r.shape[1] != dim:
            raise ValueError(f"prompt embedding {i} has shape {tuple(r.shape)}, expected [L, {dim}]")
        embeds[i, : r.shape[0]] = r.to(out_dtype)
        mask[i, : r.shape[0]] = 1
    return {"prompt_embeds": embeds, "prompt_mask": mask}


# ---------------------------------------------------------------------------
# latents
# ---------------------------------------------------------------------------


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell (8 for Qwen-Image), as the pipeline computes it."""
    return 2 ** len(vae.temperal_downsample)


def latent_size(vae, height: int, width: int) -> tuple[int, int]:
    """Latent grid for an image of ``height`` × ``width`` pixels; both must be multiples of 2·factor."""
    f = vae_scale_factor(vae)
    if height % (2 * f) or width % (2 * f):
        raise ValueError(f"image size {height}×{width} must be a multiple of {2 * f} (VAE factor {f} × 2×2 packing)")
    return height // f, width // f


def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, z, 1, 1).to(like.device)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1).to(like.device)
    return mean, std


def normalise_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents [B, C, h, w] → (z − mean)/std in float32."""
    mean, std = _stats(vae, z)
    return (z.float() - mean) / std


def denormalise_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of ``normalise_latents`` (float32)."""
    mean, std = _stats(vae, latents)
    return latents.float() * std + mean


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [−1, 1] → normalised posterior-mean latents [B, C, H/f, W/f], float32."""
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [B, 3, H, W] in [-1, 1], got shape {tuple(pixels.shape)}")
    latent_size(vae, pixels.shape[-2], pixels.shape[-1])
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(device=param.device, dtype=param.dtype)[:, :, None]).latent_dist
    return normalise_latents(vae, dist.mode()[:, :, 0])


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, C, h, w] → images [B, 3, h·f, w·f] float32 in [0, 1]."""
    param = next(vae.parameters())
    z = denormalise_latents(vae, latents).to(device=param.device, dtype=param.dtype)
    images = vae.decode(z[:, :, None], return_dict=False)[0][:, :, 0]
    return (images.float() / 2 + 0.5).clamp(0, 1)
