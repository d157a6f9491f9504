"""Data-path throughput: decode+resize images/s (per CPU) from local parquet and S3, and precache rows/s.

Builds its own data (sklearn digits upscaled to --size px JPEG, in parquet shards), then measures:
  baseline      one process, no Ray: iter_decoded over the local parquet (the per-core ceiling)
  ray_local     read_image_text over the local parquet, all rows iterated on the driver
  ray_s3        the same shards on S3: $AWS_ENDPOINT_URL when set (with --s3-uri), otherwise a
                local SeaweedFS started (and stopped) by this script
  precache      jobs/precache.py's pipeline on the tiny random-weight Qwen-Image, local -> local
Ray rows are reported cold (first run: worker start-up included) and warm (second run).
The last line printed is one JSON object.

Tiny CPU run::

    python jobs/bench_data.py --n 512 --size 256 --resolution 128 --cpus 2

On a cluster (S3 from the AWS_* variables)::

    ray job submit --working-dir . -- python jobs/bench_data.py --s3-uri s3://my-bucket/bench --n 20000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _code_path  # noqa: E402,F401 - the submitted checkout first on sys.path (jobs/_code_path.py)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1024, help="images")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="source image side (px)")
    p.add_argument("--resolution", type=int, default=128, help="training resolution (px)")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="logical CPUs for a local Ray")
    p.add_argument("--s3-uri", default=None, help="s3:// prefix to use instead of a local SeaweedFS")
    p.add_argument("--precache-n", type=int, default=256, help="images for the precache measurement")
    p.add_argument("--skip-precache", action="store_true")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    return p.parse_args(argv)


def timed_iterate(ds) -> tuple[int, float]:
    t0 = time.perf_counter()
    rows = 0
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        rows += len(batch["key"])
    return rows, time.perf_counter() - t0


def ray_rates(name: str, ds_factory, cpus: float) -> dict:
    cold_rows, cold_s = timed_iterate(ds_factory())
    warm_rows, warm_s = timed_iterate(ds_factory())
    return {f"{name}_rows": warm_rows, f"{name}_cold_s": round(cold_s, 2), f"{name}_warm_s": round(warm_s, 2),
            f"{name}_img_per_s": round(warm_rows / warm_s, 1),
            f"{name}_img_per_s_per_cpu": round(warm_rows / warm_s / cpus, 1),
            f"{name}_cold_img_per_s": round(cold_rows / cold_s, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import ray

    from twinflow.data import DatasetConfig, iter_decoded, read_image_text
    from twinflow.data.digits import write_digits_dataset
    from twinflow.ray_env import connect
    from twinflow.data.fs import filesystem_for

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"n": args.n, "size": args.size, "resolution": args.resolution, "cpus": args.cpus,
                 "image_format": "jpeg"}
    local = str(work / "parquet")
    shutil.rmtree(local, ignore_errors=True)
    t0 = time.perf_counter()
    write_digits_dataset(local, "parquet", n=args.n, shards=args.shards, size=args.size, image_format="jpeg")
    out["build_s"] = round(time.perf_counter() - t0, 2)
    cfg = DatasetConfig(source=local, resolution=args.resolution, min_size=16, decode_num_cpus=1.0)

    t0 = time.perf_counter()
    rows = sum(1 for _ in iter_decoded(cfg))
    dt = time.perf_counter() - t0
    out.update(baseline_rows=rows, baseline_img_per_s_one_process=round(rows / dt, 1))

    server = None
    if ray.is_initialized():
        cpus = ray.cluster_resources().get("CPU", 1)
    else:
        connect(num_cpus=args.cpus, log_to_driver=False)  # a fresh local Ray unless RAY_ADDRESS names one
        cpus = args.cpus
    out["ray_cpus"] = cpus
    try:
        out.update(ray_rates("ray_local", lambda: read_image_text(cfg), cpus))

        if args.s3_uri:
            s3_uri, fs = args.s3_uri.rstrip("/"), None
            out["s3"] = "configured endpoint"
        else:
            from twinflow.testing.seaweedfs import SeaweedS3

            server = SeaweedS3.start(work / "seaweedfs")
            s3_uri, fs = server.create_bucket("bench") + "/parquet", server.filesystem()
            out["s3"] = "local SeaweedFS"
        fs, path = filesystem_for(s3_uri, fs)
        t0 = time.perf_counter()
        write_digits_dataset(s3_uri, "parquet", n=args.n, shards=args.shards, size=args.size, image_format="jpeg",
                             filesystem=fs)
        out["s3_upload_s"] = round(time.perf_counter() - t0, 2)
        s3_cfg = DatasetConfig(source=s3_uri, resolution=args.resolution, min_size=16, decode_num_cpus=1.0)
        out.update(ray_rates("ray_s3", lambda: read_image_text(s3_cfg, filesystem=fs), cpus))

        if not args.skip_precache:
            out.update(bench_precache(work, args))
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(out))
    return 0


def bench_precache(work: Path, args) -> dict:
    from twinflow.data import DatasetConfig, EncodeConfig, PrecacheConfig, run_precache
    from twinflow.data.digits import write_digits_dataset
    from twinflow.models.tiny_qwen import build_tiny_qwen_image

    model = build_tiny_qwen_image(work / "tiny-qwen", "tiny")
    src = str(work / "precache-src")
    shutil.rmtree(src, ignore_errors=True)
    write_digits_dataset(src, "parquet", n=args.precache_n, shards=4, size=args.size, image_format="jpeg")
    res = {}
    for run in ("cold", "warm"):  # warm: a fresh output, but Ray workers and the OS cache are warm
        dst = str(work / f"precache-out-{run}")
        shutil.rmtree(dst, ignore_errors=True)
        cfg = PrecacheConfig(
            data=DatasetConfig(source=src, resolution=args.resolution, min_size=16, decode_num_cpus=0.5),
            encode=EncodeConfig(model_path=str(model), device="cpu", dtype="float32", batch_size=32,
                                concurrency=1, num_gpus=0.0, max_sequence_length=512),
            output=dst, part_rows=128)
        result = run_precache(cfg, log=lambda msg: None)
        res[f"precache_{run}_s"] = round(result.seconds, 2)
        res[f"precache_{run}_rows_per_s"] = round(result.manifest.rows / result.seconds, 1)
    # The same encoders in this process on one batch size: the compute ceiling the pipeline is
    # measured against (on CPU the tiny VAE dominates).
    import torch

    from twinflow.data import PipelineEncoder, iter_decoded
    from twinflow.data.transforms import to_model_pixels

    rows = list(iter_decoded(cfg.data))[:64]
    enc = PipelineEncoder(str(model), device="cpu", dtype="float32", max_sequence_length=512)
    enc.training_batch(to_model_pixels([r[1] for r in rows[:2]]), [r[2] for r in rows[:2]])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(rows), 32):
        chunk = rows[i:i + 32]
        enc.training_batch(to_model_pixels([r[1] for r in chunk]), [r[2] for r in chunk])
    res["encoder_only_rows_per_s"] = round(len(rows) / (time.perf_counter() - t0), 1)
    res["encoder_threads"] = torch.get_num_threads()
    res["precache_rows"] = args.precache_n
    res["precache_model"] = "tiny (random weights, VAE base 24, text hidden 16)"
    return res


if __name__ == "__main__":
    sys.exit(main())
