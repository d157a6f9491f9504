"""Image-text data on Ray Data: raw readers (parquet / WebDataset / image folder, local or S3),
transforms, the latent cache written by jobs/precache.py, and the per-worker training iterator.

    config.py      DatasetConfig (the ``data`` section of every job), skip-reason names, PrecacheConfig
    fs.py          filesystem_for(uri) -> (pyarrow filesystem, path): S3 from AWS_* variables
    sources.py     shards of each layout and the (key, image bytes, caption) samples in them
    transforms.py  decode / orient / resize / centre-crop or bucket, uint8 -> [-1, 1]
    ingest.py      read_image_text: Ray Dataset of decoded rows, per-shard skip counts, bad-share limit
    encode.py      PipelineEncoder: the family's latents (normalised) + prompt encoding, pipeline APIs
    cache.py       latent cache layout, manifest, read_latent_cache, load_uncond
    precache.py    the resumable actor-pool pipeline behind jobs/precache.py (config in config.py)
    loader.py      open_training_data + iter_training_batches for TorchTrainer workers
    digits.py      real small datasets (sklearn digits) in every layout, with planted bad samples
"""

# Exports resolve lazily (PEP 562): Ray Data decode workers import twinflow.data.ingest and must
# not pay for torch/diffusers imports they never use (seconds per worker process).
_EXPORTS = {
    "twinflow.data.cache": ["CACHE_SCHEMA", "LatentCacheManifest", "load_uncond", "read_cache_table",
                            "read_latent_cache", "read_manifest"],
    "twinflow.data.config": ["SKIP_REASONS", "DatasetConfig", "EncodeConfig", "PrecacheConfig"],
    "twinflow.data.encode": ["UNCOND_PROMPT", "PipelineEncoder", "pad_prompts"],
    "twinflow.data.fs": ["DataSourceError", "filesystem_for", "s3_filesystem_from_env"],
    "twinflow.data.ingest": ["ShardStats", "iter_decoded", "new_ledger", "read_image_text", "summarize"],
    "twinflow.data.loader": ["BatchSpec", "TrainingData", "iter_training_batches", "open_training_data"],
    "twinflow.data.precache": ["run_precache", "plan_precache"],
    "twinflow.data.sources": ["BadDataError", "Shard", "list_shards"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'twinflow.data' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
