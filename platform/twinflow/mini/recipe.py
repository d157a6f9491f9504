"""The recipe of the miniature paper's pretrained base: every setting that changes the built model.

A base is cached under ``$TWINFLOW_CACHE/digits-base-<key>/`` where ``key`` hashes this recipe, so a
changed recipe builds a new base and an unchanged one is never rebuilt. ``default()`` is what
``make demo`` and the miniature paper use; ``small()`` is the reduced build the tests share.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from twinflow.config.errors import require
from twinflow.config.tree import to_dict


@dataclass
class VaeRecipe:
    """A tiny ``AutoencoderKLQwenImage`` trained on the digits (reconstruction MSE + a small KL)."""

    base_dim: int = 8
    z_dim: int = 4
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    kl_weight: float = 1e-3

    def validate(self, path: str = "vae") -> None:
        require(self.base_dim >= 4 and self.z_dim >= 1, f"{path}.base_dim", "base_dim >= 4 and z_dim >= 1")
        require(self.steps >= 1 and self.batch_size >= 1 and self.lr > 0, f"{path}.steps", "steps, batch and lr > 0")


@dataclass
class TransformerRecipe:
    """The standard diffusers ``QwenImageTransformer2DModel`` (2 dual-stream blocks, 3 × 16 heads)."""

    num_layers: int = 2
    num_attention_heads: int = 3
    attention_head_dim: int = 16


@dataclass
class PretrainRecipe:
    """Plain flow matching (the ``fm()`` preset, full-parameter) through jobs/train_qwen.py."""

    steps: int = 3000
    global_batch: int = 128
    workers: int = 1
    """Ray Train workers. One worker with every core's thread is the fastest on a 2-core machine
    (jobs/bench_pretrain.py: two one-thread workers spend the difference waiting on each other)."""
    threads_per_worker: int = 2
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    """Cosine decay to lr × this."""
    cond_dropout: float = 0.1
    """Share of rows trained with the unconditional prompt, so CFG (and TwinFlow's enhancement) works."""

    def validate(self, path: str = "pretrain") -> None:
        require(self.steps >= 1, f"{path}.steps", "must be >= 1")
        require(self.workers >= 1 and self.global_batch % self.workers == 0, f"{path}.global_batch",
                f"must be a multiple of workers ({self.workers})")
        require(self.threads_per_worker >= 1, f"{path}.threads_per_worker", "must be >= 1")


@dataclass
class BaseRecipe:
    resolution: int = 32
    """Image side; the VAE downsamples by 4, so 32 px gives 8×8×z_dim latents (16 tokens)."""
    text_encoder: str = "tiny-qwen"
    """Random-weight tiny Qwen2.5-VL with the real Qwen tokenizer (models/tiny_qwen.py): different
    prompts give different, fixed embeddings; it is not trained."""
    vae: VaeRecipe = field(default_factory=VaeRecipe)
    transformer: TransformerRecipe = field(default_factory=TransformerRecipe)
    pretrain: PretrainRecipe = field(default_factory=PretrainRecipe)
    seed: int = 0

    def validate(self, path: str = "") -> None:
        require(self.resolution % 16 == 0 and self.resolution >= 16, "resolution", "must be a multiple of 16")
        require(self.text_encoder in ("tiny", "tiny-qwen"), "text_encoder", "must be tiny or tiny-qwen")
        self.vae.validate()
        self.pretrain.validate()

    def key(self) -> str:
        return hashlib.sha256(json.dumps(to_dict(self), sort_keys=True).encode()).hexdigest()[:12]


def default() -> BaseRecipe:
    return BaseRecipe()


def small() -> BaseRecipe:
    """A reduced build for the test suite (about 2.5 min on 2 cores: 141 s in the last fresh-clone run): short VAE and pretraining."""
    return BaseRecipe(vae=VaeRecipe(steps=100), pretrain=PretrainRecipe(steps=600, warmup_steps=20))


RECIPES = {"default": default, "small": small}
