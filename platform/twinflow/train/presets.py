"""Named starting configs of the training job (``--preset``); jobs/configs/*.yaml serialise the GPU ones.

    digits                  the no-argument default (make demo): TwinFlow LoRA distillation of the
                            pretrained digits base (twinflow/mini, built on first use), CPU, 2 workers
    digits-full             the same, full-parameter
    tiny                    plumbing: CPU, 2 workers, tiny random-weight model, raw digits parquet
    qwen-image-lora         Qwen-Image 20B LoRA r64, ZeRO-2, one 8-GPU node (jobs/configs/qwen_image_lora.yaml)
    qwen-image-full-zero3   Qwen-Image 20B full-parameter, ZeRO-3, two 8-GPU nodes (qwen_image_full_zero3.yaml)
"""

from __future__ import annotations

from twinflow.data.config import DatasetConfig
from twinflow.data.digits import digit_prompts
from twinflow.method.config import TwinFlowConfig
from twinflow.models.config import ModelConfig
from twinflow.models.lora import QWEN_IMAGE_LORA_TARGETS, LoraSettings
from twinflow.train.config import (DIGITS_SOURCE, TINY_MODEL, DeepSpeedSettings, EncodeSettings, LoggingSettings,
                                   OptimConfig, ProbeSettings, RunSettings, SampleSettings, ScalingSettings,
                                   TrainConfig)

DIGITS_BASE = "digits-base"  # twinflow.named: the pretrained base (model.path) and its latent cache (data.source)


def digits() -> TrainConfig:
    """make demo: TwinFlow (λ = 1/3, LoRA-EMA teacher) distils the pretrained digits base into a 1-2 step
    generator: its latent cache through Ray Train + DeepSpeed ZeRO-2 on 2 CPU workers. The grid shows
    the base at 100 and 1 NFE beside TwinFlow at 1/2/4; the digits probe scores both at the end."""
    return TrainConfig(
        model=ModelConfig(path=DIGITS_BASE, mode="lora", ema=True, gradient_checkpointing=False,
                                   dtype="float32", lora=LoraSettings(rank=16, alpha=16.0)),
        data=DatasetConfig(source=DIGITS_BASE, format="latent_cache", resolution=32),
        encode=EncodeSettings(max_sequence_length=64, device="cpu", dtype="float32"),
        # No CFG enhancement: the target is the base's own (unguided) distribution, which the digits
        # benchmark compares against; with 0.8 the student learns guided digits (fewer, bolder modes).
        twinflow=TwinFlowConfig(teacher="ema", teacher_ema_decay=0.99, enhance_ratio=0.0),
        optim=OptimConfig(lr=2e-3, schedule="cosine", warmup_steps=20, min_lr_ratio=0.1),
        # 48 per worker × 2 workers = 96 rows a step: λ = 1/3 is realised exactly (16/32/32/16 rows).
        deepspeed=DeepSpeedSettings(zero_stage=2, precision="fp32", micro_batch_per_gpu=48),
        scaling=ScalingSettings(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}, threads_per_worker=1,
                                timeout_s=600),
        run=RunSettings(name="digits-twinflow", storage_path="./runs", max_steps=800, checkpoint_every=400,
                        num_to_keep=1, max_failures=1, export_pipeline=True, log_every=10),
        sample=SampleSettings(prompts=[p for key, p, _ in digit_prompts(1)], seeds=[0], nfe=[1, 2, 4],
                              base_nfe=[100, 1], height=32, width=32),
        logging=LoggingSettings(mlflow="auto"),
        probe=ProbeSettings(kind="digits", nfe=[1, 2, 4], images_per_prompt=16, base_nfe=[100, 1]),
    )


def digits_full() -> TrainConfig:
    """The demo distillation full-parameter: every weight and E2 train (self teacher, as at 20B)."""
    cfg = digits()
    cfg.model = ModelConfig(path=DIGITS_BASE, mode="full", dtype="float32", gradient_checkpointing=False)
    cfg.twinflow = TwinFlowConfig(teacher="self", enhance_ratio=0.0)
    cfg.optim = OptimConfig(lr=5e-4, schedule="cosine", warmup_steps=20, min_lr_ratio=0.1)
    cfg.run.name = "digits-twinflow-full"
    return cfg

def tiny() -> TrainConfig:
    """The no-argument default: tiny random-weight Qwen-Image, sklearn digits, 2 CPU workers, ZeRO-2 LoRA
    with a LoRA-EMA teacher, local storage under ./runs; a few minutes on 2 cores."""
    return TrainConfig(
        model=ModelConfig(path=TINY_MODEL, mode="lora", ema=True, gradient_checkpointing=False,
                                   dtype="float32", lora=LoraSettings(rank=8, alpha=8.0)),
        data=DatasetConfig(source=DIGITS_SOURCE, format="parquet", resolution=64, min_size=16,
                           decode_batch_rows=32, decode_num_cpus=0.5),
        encode=EncodeSettings(max_sequence_length=512, device="cpu", dtype="float32"),  # caps, never truncates here
        twinflow=TwinFlowConfig(teacher="ema", teacher_ema_decay=0.99),
        optim=OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1),
        # 3 per worker × 2 workers × 2 accumulation steps = 12: λ = 1/3 is realised exactly (2/4/4/2 rows)
        deepspeed=DeepSpeedSettings(zero_stage=2, precision="auto", micro_batch_per_gpu=3, gradient_accumulation=2),
        scaling=ScalingSettings(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}, timeout_s=600),
        run=RunSettings(name="tiny-digits", storage_path="./runs", max_steps=120, checkpoint_every=40, num_to_keep=2,
                        max_failures=1, export_pipeline=True),
        sample=SampleSettings(prompts=["a handwritten digit three", "a handwritten digit seven"], seeds=[0, 1],
                              height=64, width=64),
    )


def qwen_image_lora() -> TrainConfig:
    """Qwen-Image 20B, LoRA r64 (the reference's 2-order LoRA recipe, docs/METHOD.md §16), ZeRO-2, bf16,
    one 8-GPU node, pre-cached latents on S3. jobs/configs/qwen_image_lora.yaml serialises it."""
    return TrainConfig(
        model=ModelConfig(path="Qwen/Qwen-Image", family="qwen-image", mode="lora", ema=True, dtype="bfloat16",
                          gradient_checkpointing=True,
                          lora=LoraSettings(rank=64, alpha=64.0, targets=list(QWEN_IMAGE_LORA_TARGETS))),
        data=DatasetConfig(source="s3://your-bucket/qwen-image/latents-512", format="latent_cache", resolution=512),
        twinflow=TwinFlowConfig(teacher="ema", teacher_ema_decay=0.99, enhance_ratio=0.8),
        optim=OptimConfig(lr=1e-4, betas=(0.9, 0.99)),
        deepspeed=DeepSpeedSettings(zero_stage=2, precision="bf16", micro_batch_per_gpu=4),
        scaling=ScalingSettings(num_workers=8, use_gpu=True),
        run=RunSettings(name="qwen-image-lora", storage_path="s3://your-bucket/twinflow/runs", max_steps=10000,
                        checkpoint_every=500),
        sample=SampleSettings(height=1024, width=1024),
    )


def qwen_image_full_zero3() -> TrainConfig:
    """Qwen-Image 20B full-parameter (E2 target-time embedder), ZeRO-3 over two 8-GPU nodes, bf16."""
    return TrainConfig(
        model=ModelConfig(path="Qwen/Qwen-Image", family="qwen-image", mode="full", dtype="bfloat16",
                          gradient_checkpointing=True, lora=LoraSettings(targets=list(QWEN_IMAGE_LORA_TARGETS))),
        data=DatasetConfig(source="s3://your-bucket/qwen-image/latents-512", format="latent_cache", resolution=512),
        twinflow=TwinFlowConfig(teacher="self", enhance_ratio=0.8),
        optim=OptimConfig(lr=1e-5, betas=(0.9, 0.99)),
        deepspeed=DeepSpeedSettings(zero_stage=3, precision="bf16", micro_batch_per_gpu=2),
        scaling=ScalingSettings(num_workers=16, use_gpu=True),
        run=RunSettings(name="qwen-image-full", storage_path="s3://your-bucket/twinflow/runs", max_steps=10000,
                        checkpoint_every=250),
        sample=SampleSettings(height=1024, width=1024),
    )


PRESETS = {"digits": digits, "digits-full": digits_full, "tiny": tiny, "qwen-image-lora": qwen_image_lora,
           "qwen-image-full-zero3": qwen_image_full_zero3}
