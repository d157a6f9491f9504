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
starting Ray. Config errors and unusable inputs (an unreadable source, a shard over
data.bad_share_limit, a truncated model file) are one line on stderr, exit code 2; Ctrl-C says how
to resume (exit code 130). Ray: a fresh local instance, RAY_ADDRESS when set, or ``--address``.
"""

from __future__ import annotations

import json
import sys

import _code_path  # noqa: E402,F401 - the submitted checkout first on sys.path (jobs/_code_path.py)

from twinflow.config import dump_yaml  # noqa: E402
from twinflow.config.cli import job_parser, exit_config_error, fail, interrupted, resolve_config  # noqa: E402
from twinflow.config.errors import ConfigError  # noqa: E402
from twinflow.data.config import DatasetConfig, EncodeConfig, PrecacheConfig  # noqa: E402
from twinflow.data.fs import DataSourceError  # noqa: E402
from twinflow.data.precache import plan_precache, run_precache  # noqa: E402
from twinflow.data.sources import BadDataError  # noqa: E402
from twinflow.files import FileProblem  # noqa: E402
from twinflow.ray_resources import DATA  # noqa: E402


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
    args = job_parser(__doc__, PRESETS, "default").parse_args(argv)
    cfg = resolve_config(PrecacheConfig, args, PRESETS)

    if args.dry_run:
        print(dump_yaml(cfg))
        try:
            print(json.dumps({"plan": plan_precache(cfg)}))
        except ConfigError as exc:
            exit_config_error(exc)
        except (DataSourceError, FileProblem) as exc:
            return fail(exc)
        return 0

    from twinflow.ray_env import connect

    try:
        connect()
        result = run_precache(cfg)
    except ConfigError as exc:
        exit_config_error(exc)
    except (BadDataError, DataSourceError, FileProblem) as exc:
        return fail(exc)
    except KeyboardInterrupt:
        return interrupted("the same command (finished shards are kept)")
    print(json.dumps(result.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
