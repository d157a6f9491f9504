"""Training Qwen-Image with TwinFlow on Ray Train + DeepSpeed (the job behind jobs/train_qwen.py).

    config.py      TrainConfig: model / data / encode / twinflow / optim / deepspeed / scaling / run /
                   sample / logging / debug sections, cross-section validation
    presets.py     tiny (the CPU default), qwen-image-lora, qwen-image-full-zero3
    plan.py        --dry-run: per-rank, per-accumulation-step block sizes, realised λ, DeepSpeed
                   config, memory-plan hook
    ds_config.py   TrainConfig -> DeepSpeed config dict; the LR schedule (warm-up, constant/cosine)
    prepare.py     driver: tiny model / digits data built on first use; re-submission check
    storage.py     RunStorage: <storage_path>/<name> on local disk or S3
    trainer.py     driver: TorchTrainer (ScalingConfig, TorchConfig, RunConfig, datasets) -> run_training
    loop.py        the worker loop: DeepSpeed engine, TwinFlow objective over the global batch,
                   NaN skipping, checkpoints, resume
    engine.py      building the adapter under DeepSpeed (ZeRO-3: zero.Init), ZeRO-3 call equalizer
    batches.py     a rank's resumable micro-batch stream from its dataset shard
    state.py       checkpoint layout beside DeepSpeed's shards: train state, RNG, completeness
    samples.py     sample grids (prompts × seeds by 1/2/4 NFE)
    tracking.py    progress bar, TensorBoard, MLflow
    export.py      <run>/final: transformer or LoRA, optional TwinFlowQwenImagePipeline folder
    faults.py      injected worker exits and NaN losses (config section debug)

Import the submodules directly; this package imports nothing heavy.
"""
