"""Feeding Ray Train workers: the dataset + DataConfig for TorchTrainer, and the per-worker iterator.

Driver side::

    data = open_training_data(cfg.data, batch_size=4, model_path=...)   # raw or latent cache
    trainer = TorchTrainer(loop, train_loop_config={"batches": data.spec, ...},
                           scaling_config=ScalingConfig(num_workers=N, resources_per_worker={"CPU": 0.5}),
                           **data.trainer_kwargs())                     # datasets= + DataConfig(equal split)

Worker side::

    for batch in iter_training_batches(ray.train.get_dataset_shard("train"), spec, device=device):
        batch["latents"]        # [B, C, H, W] float32
        batch["prompt_embeds"]  # [B, L, D]    float32, L = longest prompt of the batch
        batch["prompt_mask"]    # [B, L]       int64

``DataConfig(datasets_to_split=["train"])`` makes Ray Train call ``streaming_split(world, equal=True)``:
every rank receives the same number of rows per epoch, and with ``drop_last`` the same number of
batches, which DDP/DeepSpeed need (a rank that runs out first would hang the others' all-reduce).
With crop=buckets a batch holds one bucket, so per-rank batch counts can still differ; there
``spec.equalize`` stops all ranks together (an all-reduce MIN of "I have a batch" per step).

On 2-CPU machines give Train workers fractional CPUs (e.g. 0.5), or the Ray Data read tasks get
no CPU and the run hangs (ENVIRONMENT.md §5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Literal

import torch

from twinflow.data.cache import decode_rows, read_latent_cache
from twinflow.data.config import DatasetConfig
from twinflow.data.encode import cached_encoder, pad_prompts
from twinflow.data.ingest import new_ledger, read_image_text
from twinflow.data.fs import filesystem_for
from twinflow.data.sources import detect_format
from twinflow.data.transforms import to_model_pixels


@dataclass
class BatchSpec:
    """What a worker needs to turn its shard into training batches (picklable, goes in train_loop_config)."""

    kind: Literal["cache", "raw"]
    batch_size: int
    cache_dtype: str = "float32"
    model_path: str | None = None
    """raw: the Qwen-Image folder whose VAE/text encoder encode in-process (small models only)."""
    encode_device: str = "auto"
    encode_dtype: str = "auto"
    max_sequence_length: int = 512
    equalize: bool = False
    """All-reduce per step so every rank stops at the same step (on by default for buckets)."""
    memory_epochs: bool = False
    """Replay epochs after the first from memory, reshuffled (DatasetConfig.memory_epochs)."""
    drop_last: bool = True
    prefetch_batches: int = 2


@dataclass
class TrainingData:
    dataset: object               # ray.data.Dataset
    spec: BatchSpec
    manifest: object | None = None  # LatentCacheManifest for caches
    ledger: object | None = None    # ShardLedger actor for raw data (skip counts per shard)

    def trainer_kwargs(self, name: str = "train") -> dict:
        """``datasets=`` and ``dataset_config=`` for TorchTrainer: this dataset split equally across ranks."""
        from ray.train import DataConfig

        return {"datasets": {name: self.dataset}, "dataset_config": DataConfig(datasets_to_split=[name])}

    def skip_counts(self) -> list[dict]:
        """Per-shard ShardStats dicts reported so far (raw data), or the cache manifest's shard entries."""
        import ray

        if self.ledger is not None:
            return ray.get(self.ledger.all.remote())
        return list(self.manifest.shards) if self.manifest is not None else []


def _memory_epochs(cfg: DatasetConfig, manifest, world_size: int) -> bool:
    if cfg.memory_epochs != "auto":
        return cfg.memory_epochs == "on"
    elem = 2 if manifest.dtype in ("bfloat16", "float16") else 4
    latent = max((math.prod(s) for s in manifest.latent_shapes), default=0)
    per_row = elem * (latent + (manifest.embed_dim or 0) * manifest.max_prompt_len) + 200
    return manifest.rows * per_row / max(1, world_size) <= cfg.memory_epochs_max_gib * 2**30


def open_training_data(cfg: DatasetConfig, batch_size: int, *, model_path: str | None = None, filesystem=None,
                       encode_device: str = "auto", encode_dtype: str = "auto", max_sequence_length: int = 512,
                       equalize: bool | None = None, world_size: int = 1) -> TrainingData:
    """The Ray Dataset and BatchSpec for ``cfg.source``: a latent cache or raw shards (then ``model_path``
    names the pipeline whose VAE and text encoder run inside each Train worker)."""
    fs, root = filesystem_for(cfg.source, filesystem)
    fmt = detect_format(cfg, fs, root)
    if fmt == "latent_cache":
        ds, manifest = read_latent_cache(cfg.source, fs)
        buckets = len(manifest.latent_shapes) > 1
        spec = BatchSpec(kind="cache", batch_size=batch_size, cache_dtype=manifest.dtype,
                         equalize=buckets if equalize is None else equalize,
                         memory_epochs=not buckets and _memory_epochs(cfg, manifest, world_size))
        return TrainingData(ds, spec, manifest=manifest)
    if not model_path:
        raise ValueError("raw image-text data is encoded inside the Train workers: pass model_path (the "
                         "Qwen-Image folder), or precache it with jobs/precache.py and point data.source at the cache")
    ledger = new_ledger()
    ds = read_image_text(cfg, filesystem=fs, ledger=ledger)
    spec = BatchSpec(kind="raw", batch_size=batch_size, model_path=str(model_path), encode_device=encode_device,
                     encode_dtype=encode_dtype, max_sequence_length=max_sequence_length,
                     equalize=(cfg.crop == "buckets") if equalize is None else equalize)
    return TrainingData(ds, spec, ledger=ledger)


# ----------------------------------------------------------------------------- collate


def collate_cached(latents: list[torch.Tensor], embeds: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    batch = pad_prompts(embeds)
    batch["latents"] = torch.stack(latents)
    return batch


def _shape_key(batch: dict, i: int, kind: str) -> tuple:
    if kind == "cache":
        return tuple(int(s) for s in batch["latents_shape"][i])
    return tuple(batch["image"][i].shape)


def _take(batch: dict, idx: list[int]) -> dict:
    return {k: [v[i] for i in idx] for k, v in batch.items()}


def iter_rows_by_shape(batches: Iterator[dict], batch_size: int, kind: str) -> Iterator[dict]:
    """Regroup Ray batches so that every output batch has ``batch_size`` rows of one shape.

    Center-crop data passes straight through (one shape); bucketed data waits per bucket. Leftovers
    of each bucket at the end of the epoch are dropped (as drop_last drops a short last batch).
    """
    pending: dict[tuple, dict[str, list]] = {}
    for batch in batches:
        n = len(batch["key"])
        shapes = [_shape_key(batch, i, kind) for i in range(n)]
        waiting = pending.get(shapes[0]) if n else None
        if n == batch_size and all(s == shapes[0] for s in shapes) and not (waiting and waiting["key"]):
            yield batch
            continue
        for shape in dict.fromkeys(shapes):
            idx = [i for i, s in enumerate(shapes) if s == shape]
            buf = pending.setdefault(shape, {k: [] for k in batch})
            for k, v in _take(batch, idx).items():
                buf[k].extend(v)
            while len(buf["key"]) >= batch_size:
                yield {k: v[:batch_size] for k, v in buf.items()}
                for k in buf:
                    del buf[k][:batch_size]


def to_training_batch(batch: dict, spec: BatchSpec) -> dict[str, torch.Tensor]:
    """{"latents", "prompt_embeds", "prompt_mask"} from one grouped batch of dataset rows."""
    if spec.kind == "cache":
        latents, embeds = decode_rows(batch, spec.cache_dtype)
        return collate_cached(latents, embeds)
    encoder = cached_encoder(spec.model_path, spec.encode_device, spec.encode_dtype, spec.max_sequence_length)
    pixels = to_model_pixels(batch["image"])
    return encoder.training_batch(pixels, [str(t) for t in batch["text"]])


def all_ranks_have_batch(have: bool) -> bool:
    """MIN over ranks of "I have a batch" (bucketed data can run out unevenly)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return have
    # NCCL reduces CUDA tensors only; gloo CPU ones.
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([1 if have else 0], dtype=torch.int32, device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def iter_training_batches(shard, spec: BatchSpec, device: torch.device | str | None = None) -> Iterator[dict]:
    """Training batch dicts (docs/DESIGN.md "Training batch") from this worker's dataset shard.

    ``shard`` is ``ray.train.get_dataset_shard(name)`` (a DataIterator) or any ray Dataset.
    One call = one epoch. Raw data is encoded here with the spec's model (cached per process).
    """
    device = torch.device(device) if device is not None else None
    raw = shard.iter_batches(batch_size=spec.batch_size, batch_format="numpy", drop_last=spec.drop_last,
                             prefetch_batches=spec.prefetch_batches)
    grouped = iter_rows_by_shape(raw, spec.batch_size, spec.kind)
    while True:
        nxt = next(grouped, None)
        if spec.equalize and not all_ranks_have_batch(nxt is not None):
            return
        if nxt is None:
            return
        batch = to_training_batch(nxt, spec)
        if device is not None:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        yield batch


def rows_per_rank(num_rows: int, world_size: int) -> int:
    """Rows each rank gets from ``streaming_split(world_size, equal=True)``."""
    return num_rows // world_size


def batches_per_rank(num_rows: int, world_size: int, batch_size: int) -> int:
    """Batches per rank and epoch with center crop and drop_last (steps_per_epoch for schedulers)."""
    return rows_per_rank(num_rows, world_size) // batch_size


__all__ = ["BatchSpec", "TrainingData", "open_training_data", "iter_training_batches", "to_training_batch",
           "all_ranks_have_batch", "collate_cached",
           "iter_rows_by_shape", "rows_per_rank", "batches_per_rank"]
