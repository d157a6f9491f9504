"""Pre-cache VAE latents and prompt embeddings of an image-text dataset (Ray Data actor pools).

Training then reads only latents and embeddings (twinflow.data.read_latent_cache): the 7B text
encoder and the VAE never sit in the training processes. Re-running on the same output resumes:
finished shards are skipped, a shard interrupted mid-way is redone. Layout and manifest:
platform/twinflow/data/cache.py.

Tiny CPU run (random-weight model, sklearn digits as data)::

    python -m twinflow.data.digits /tmp/digits-pq --format parquet --n 256 --shards 4 --size 64
    python jobs/precache.py --preset tiny --set data.source=/tmp/digits-pq --set output=/tmp/digits-cache

On a cluster (S3 endpoint/keys from AWS_* variables; encode actors take one GPU each)::

    ray job submit --working-dir . -- python jobs/precache.py \\
        --set data.source=s3://my-bucket/images --set output=s3://my-bucket/cache-512 \\
        --set encode.model_path=/models/Qwen-Image --set encode.concurrency=8

Add ``--dry-run`` to print the resolved config and the plan (shards found / already cached) without
starting Ray.
"""

from __future__ import annotations

import argparse
import json
import sys

from twinflow.config import dump_yaml
from twinflow.config.cli import add_config_args, exit_config_error, resolve_config
from twinflow.config.errors import ConfigError
from twinflow.data.config import DatasetConfig
from twinflow.data.fs import DataSourceError
from twinflow.data.config import EncodeConfig, PrecacheConfig
from twinflow.data.precache import plan_precache, run_precache
from twinflow.data.sources import BadDataError
from twinflow.ray_resources import DATA


def default() -> PrecacheConfig:
    """Qwen-Image at 512² on a GPU cluster: decode on CPU data nodes, one GPU per encode actor."""
    return PrecacheConfig(
        data=DatasetConfig(resolution=512, crop="center", decode_resources={DATA: 1}),
        encode=EncodeConfig(model_path="Qwen/Qwen-Image", dtype="auto", batch_size=16, concurrency=8, num_gpus=1.0),
        cache_dtype="bfloat16", part_rows=256)


def tiny() -> PrecacheConfig:
    """The random-weight tiny Qwen-Image on CPU, 64² digits: seconds, for demos and CI."""
    return PrecacheConfig(
        data=DatasetConfig(resolution=64, min_size=16, decode_batch_rows=64, decode_num_cpus=0.5),
        encode=EncodeConfig(model_path="tiny", device="cpu", dtype="float32", batch_size=32, concurrency=1,
                            num_gpus=0.0, max_sequence_length=512),
        cache_dtype="float32", part_rows=128)


PRESETS = {"default": default, "tiny": tiny}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(parser, PRESETS, "default")
    args = parser.parse_args(argv)
    cfg = resolve_config(PrecacheConfig, args, PRESETS)

    if args.dry_run:
        print(dump_yaml(cfg))
        try:
            print(json.dumps({"plan": plan_precache(cfg)}))
        except (DataSourceError, ConfigError) as exc:
            print(json.dumps({"plan": None, "error": str(exc)}))
        return 0

    import ray

    if not ray.is_initialized():
        ray.init()  # inside `ray job submit` this connects to the cluster
    try:
        result = run_precache(cfg)
    except ConfigError as exc:
        exit_config_error(exc)
    except (BadDataError, DataSourceError) as exc:
        print(f"precache stopped: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
