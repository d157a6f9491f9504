"""Build the miniature paper's pretrained base: a real Qwen-Image pipeline that draws the digits.

    python jobs/build_base.py                 # or: model.path: digits-base in any job (built on first use)

Stages (each resumable; the folder counts as built only once ``_complete`` is written):
  1 data      the 1,797 real digits at ``resolution`` px with captions ("a handwritten digit seven"),
              as parquet shards (twinflow.data.digits)
  2 vae       a tiny AutoencoderKLQwenImage trained on them (mini/vae.py; latents_mean/std set)
  3 init      a Qwen-Image pipeline folder: that VAE, the tiny text encoder with the real Qwen tokenizer
              (random weights: different prompts still give different, fixed embeddings), and a
              randomly initialised standard QwenImageTransformer2DModel
  4 cache     the latent cache of stage 1 through jobs/precache.py's pipeline (Ray Data actor pool)
  5 pretrain  plain flow matching (fm() preset, full-parameter, CFG dropout) through jobs/train_qwen.py:
              Ray Train + DeepSpeed ZeRO-2 workers reading the latent cache, the 20B path
  6 pipeline  ``pipeline/``: stage 3's folder with the pretrained transformer, saved as the plain
              diffusers class, so ``QwenImagePipeline.from_pretrained`` loads it and samples digits at
              50-100 steps with its own scheduler; TwinFlow starts from it as from ``Qwen/Qwen-Image``
  7 check     the digit classifier on VAE reconstructions and on the base's own 50-step samples
              -> report.json

Layout of ``$TWINFLOW_CACHE/digits-base-<recipe key>/``: data/ vae/ init/ cache/ runs/pretrain/
pipeline/ recipe.json report.json _complete.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from twinflow.config.tree import to_dict
from twinflow.mini.recipe import BaseRecipe, default
from twinflow.models.tiny_qwen import build_once, cache_dir

COMPLETE = "_complete"
DIGITS_SHARDS = 4
SAMPLE_PROMPTS = [f"a handwritten digit {w}" for w in
                  ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]


def base_dir(recipe: BaseRecipe | None = None) -> Path:
    recipe = recipe or default()
    return cache_dir() / f"digits-base-{recipe.key()}"


def is_built(recipe: BaseRecipe | None = None) -> bool:
    return (base_dir(recipe) / COMPLETE).is_file()


# ---------------------------------------------------------------------------
# twinflow.named providers
# ---------------------------------------------------------------------------


def named_base_pipeline(name: str, build: bool = True) -> str:
    root = build_base() if build else base_dir()
    return str(root / "pipeline")


def named_base_cache(name: str, build: bool = True) -> str:
    root = build_base() if build else base_dir()
    return str(root / "cache")


def named_architecture(name: str) -> dict[str, Any]:
    return transformer_config(default())


# ---------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------


def transformer_config(recipe: BaseRecipe) -> dict[str, Any]:
    """The standard QwenImageTransformer2DModel arguments: 2×2 patches of z_dim-channel latents, the
    text encoder's width as joint_attention_dim, RoPE axes summing to the head dim."""
    from twinflow.models.tiny_qwen import TINY_PRESETS

    t, z = recipe.transformer, recipe.vae.z_dim
    head = t.attention_head_dim
    return {"patch_size": 2, "in_channels": 4 * z, "out_channels": z, "num_layers": t.num_layers,
            "attention_head_dim": head, "num_attention_heads": t.num_attention_heads,
            "joint_attention_dim": TINY_PRESETS[recipe.text_encoder].text_hidden, "guidance_embeds": False,
            "axes_dims_rope": [head // 2, head // 4, head // 4]}


def _stage(root: Path, name: str, log: Callable[[str], None], build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` once; its output lands at root/name atomically (a marker inside)."""
    target = root / name
    if (target / COMPLETE).is_file():
        log(f"[base] {name}: done before, reused")
        return target
    t0 = time.time()
    log(f"[base] {name} ...")

    def wrapped(tmp: Path) -> None:
        build(tmp)
        (tmp / COMPLETE).write_text("ok\n")

    build_once(target, COMPLETE, wrapped)
    log(f"[base] {name}: {time.time() - t0:.0f} s")
    return target


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, mininterval=1.0)

    def update(step: int, info: dict) -> None:
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix({k: f"{v:.4f}" for k, v in info.items()})
        if step == total - 1:
            bar.close()

    return update


def write_data(recipe: BaseRecipe, out: Path) -> None:
    from twinflow.data.digits import write_digits_dataset

    write_digits_dataset(str(out), "parquet", n=1797, shards=DIGITS_SHARDS, size=recipe.resolution)


def write_vae(recipe: BaseRecipe, out: Path) -> None:
    from twinflow.mini.vae import train_vae

    vae = train_vae(recipe.vae, recipe.resolution, recipe.seed, _progress(recipe.vae.steps, "[base] vae"))
    vae.save_pretrained(out)


def write_init_pipeline(recipe: BaseRecipe, vae_dir: Path, out: Path) -> None:
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from diffusers import QwenImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from twinflow.models.tiny_qwen import resolve_tiny_model

    text_side = Path(resolve_tiny_model(recipe.text_encoder))
    torch.manual_seed(recipe.seed + 1)
    transformer = QwenImageTransformer2DModel(**transformer_config(recipe))
    pipe = QwenImagePipeline(
        transformer=transformer, vae=AutoencoderKLQwenImage.from_pretrained(vae_dir),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(text_side / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(text_side / "tokenizer"), scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.save_pretrained(out)


def write_cache(recipe: BaseRecipe, data: Path, init: Path, out: Path) -> None:
    from twinflow.data.config import DatasetConfig, EncodeConfig, PrecacheConfig
    from twinflow.data.precache import run_precache
    from twinflow.ray_env import connect

    connect()
    cfg = PrecacheConfig(
        data=DatasetConfig(source=str(data), format="parquet", resolution=recipe.resolution, min_size=8,
                           decode_batch_rows=256, decode_num_cpus=0.5),
        encode=EncodeConfig(model_path=str(init), device="cpu", dtype="float32", batch_size=128, concurrency=1,
                            num_gpus=0.0, max_sequence_length=64),
        output=str(out), cache_dtype="float32", part_rows=512)
    cfg.validate()
    result = run_precache(cfg, log=lambda m: print(f"[base] {m}", file=sys.stderr, flush=True))
    if result.manifest.rows != 1797:
        raise RuntimeError(f"the digits latent cache holds {result.manifest.rows} rows, expected 1797")


def pretrain_config(recipe: BaseRecipe, init: Path, cache: Path, runs: Path):
    """The TrainConfig of stage 5: fm(), full-parameter, fp32 on CPU workers, ZeRO-2, from the latent cache."""
    from twinflow.data.config import DatasetConfig
    from twinflow.method.config import fm
    from twinflow.models.config import ModelConfig
    from twinflow.train.config import (DeepSpeedSettings, EncodeSettings, LoggingSettings, OptimConfig, RunSettings,
                                       SampleSettings, ScalingSettings, TrainConfig)

    p = recipe.pretrain
    return TrainConfig(
        model=ModelConfig(path=str(init), mode="full", dtype="float32", gradient_checkpointing=False),
        data=DatasetConfig(source=str(cache), format="latent_cache", resolution=recipe.resolution),
        encode=EncodeSettings(max_sequence_length=64, device="cpu", dtype="float32"),
        twinflow=dataclasses.replace(fm(), cond_dropout=p.cond_dropout),
        optim=OptimConfig(lr=p.lr, schedule="cosine", warmup_steps=p.warmup_steps, min_lr_ratio=p.min_lr_ratio),
        deepspeed=DeepSpeedSettings(zero_stage=2, precision="fp32", micro_batch_per_gpu=p.global_batch // p.workers),
        # Half a CPU per thread in Ray's books, so Ray Data's first pass over the cache still gets one.
        scaling=ScalingSettings(num_workers=p.workers, use_gpu=False,
                                resources_per_worker={"CPU": 0.5 * p.threads_per_worker},
                                threads_per_worker=p.threads_per_worker, timeout_s=600),
        run=RunSettings(name="pretrain", storage_path=str(runs), max_steps=p.steps,
                        checkpoint_every=max(1, p.steps // 3), num_to_keep=1, max_failures=1, seed=recipe.seed,
                        log_every=10),
        sample=SampleSettings(prompts=SAMPLE_PROMPTS, seeds=[0], nfe=[1, 4, 50], sampler="ode",
                              height=recipe.resolution, width=recipe.resolution),
        logging=LoggingSettings(mlflow="off"),
    )


def write_pretrained(recipe: BaseRecipe, init: Path, cache: Path, root: Path, out: Path) -> dict:
    """Stage 5 (a run under root/runs that resumes when re-entered) and stage 6 into ``out``."""
    import torch
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    from twinflow.models.target_time import E2_PREFIX
    from twinflow.train.trainer import run_training

    outcome = run_training(pretrain_config(recipe, init, cache, root / "runs"))
    trained = Path(outcome.summary["final"]) / "transformer"
    from safetensors.torch import load_file

    state = load_file(str(trained / "diffusion_pytorch_model.safetensors"))
    plain = QwenImageTransformer2DModel(**transformer_config(recipe))
    # E2 got no gradient (flow matching has r = t, so its weight t − r is 0): the plain model is exact.
    plain.load_state_dict({k: v for k, v in state.items() if not k.startswith(E2_PREFIX)}, strict=True)
    pipe = QwenImagePipeline.from_pretrained(init, transformer=plain.to(torch.float32))
    pipe.save_pretrained(out)
    last = outcome.summary.get("last") or {}
    return {"pretrain_seconds": round(outcome.seconds, 1), "pretrain_steps": outcome.summary["step"],
            "pretrain_final_loss": last.get("loss/total"), "images_per_s": last.get("images_per_s")}


def check_base(recipe: BaseRecipe, pipeline: Path, vae_dir: Path, images_per_class: int = 10) -> dict:
    """Stage 7: the classifier on VAE reconstructions and on the base's own 50-step diffusers samples."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline

    from twinflow.mini.vae import reconstruction_accuracy
    from twinflow.study.datasets import images_to_digits, load_digits_at
    from twinflow.study.metrics import DigitsJudge

    judge = DigitsJudge.fit(load_digits_at(recipe.resolution), classifier="svc", seed=recipe.seed)
    report = {"classifier_heldout_accuracy": judge.heldout_accuracy,
              "vae": reconstruction_accuracy(AutoencoderKLQwenImage.from_pretrained(vae_dir), recipe.resolution,
                                             judge, recipe.seed)}
    pipe = QwenImagePipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    labels, images = [], []
    for c, prompt in enumerate(SAMPLE_PROMPTS):
        gens = [torch.Generator().manual_seed(1000 * c + k) for k in range(images_per_class)]
        out = pipe(prompt=[prompt] * images_per_class, height=recipe.resolution, width=recipe.resolution,
                   num_inference_steps=50, true_cfg_scale=1.0, generator=gens, output_type="np").images
        images.append((np.asarray(out) * 255).round().clip(0, 255).astype(np.uint8))
        labels += [c] * images_per_class
    pred, _ = judge.classify(images_to_digits(np.concatenate(images)))
    report["pipeline_50_steps"] = {"images": len(labels), "accuracy": float((pred == np.array(labels)).mean())}
    return report


# ---------------------------------------------------------------------------
# the build
# ---------------------------------------------------------------------------


def build_base(recipe: BaseRecipe | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Build (or reuse) the base for ``recipe``; returns its folder (``<folder>/pipeline`` is the model)."""
    recipe = recipe or default()
    recipe.validate()
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    root = base_dir(recipe)
    if (root / COMPLETE).is_file():
        return root
    t0 = time.time()
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.json").write_text(json.dumps(to_dict(recipe), indent=1))
    log(f"[base] building the digits base into {root} (recipe {recipe.key()})")
    data = _stage(root, "data", log, lambda out: write_data(recipe, out))
    vae = _stage(root, "vae", log, lambda out: write_vae(recipe, out))
    init = _stage(root, "init", log, lambda out: write_init_pipeline(recipe, vae, out))
    cache = _stage(root, "cache", log, lambda out: write_cache(recipe, data, init, out))
    info: dict = {}
    pipeline = _stage(root, "pipeline", log, lambda out: info.update(write_pretrained(recipe, init, cache, root, out)))
    report = {"recipe": recipe.key(), **info, **check_base(recipe, pipeline, vae), "seconds": round(time.time() - t0, 1)}
    (root / "report.json").write_text(json.dumps(report, indent=1))
    (root / COMPLETE).write_text("ok\n")
    log(f"[base] done in {report['seconds']:.0f} s: {json.dumps(report)}")
    return root


def clear_base(recipe: BaseRecipe | None = None) -> None:
    shutil.rmtree(base_dir(recipe), ignore_errors=True)
