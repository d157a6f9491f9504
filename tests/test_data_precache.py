"""Pre-caching on Ray Data actor pools into the real SeaweedFS S3 server, resume, and training ingest.

One precache run (S3 -> S3, tiny random-weight Qwen-Image whose VAE has non-trivial latents_mean/std)
is shared by the tests of this module; values are checked against encoding with diffusers directly.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pyarrow.fs import FileSelector, FileType

from twinflow.config import ConfigError, dump_yaml
from twinflow.data import (DatasetConfig, EncodeConfig, PrecacheConfig, iter_decoded, iter_training_batches,
                           load_uncond, open_training_data, read_cache_table, read_latent_cache, run_precache)
from twinflow.data.cache import MARKERS_DIR, PARTS_DIR, bytes_to_tensor
from twinflow.data.config import EMPTY_CAPTION, NO_CAPTION, TOO_SMALL, UNDECODABLE
from twinflow.data.digits import write_digits_dataset
from twinflow.data.encode import UNCOND_PROMPT

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.s3]

LATENTS_MEAN = [0.3, -0.2, 0.1, 0.05]
LATENTS_STD = [0.5, 2.0, 1.5, 0.8]


@pytest.fixture(scope="module")
def tiny_model(tiny_qwen_image, tmp_path_factory):
    """The tiny pipeline with a VAE whose latents_mean/std are not 0/1, so normalisation is visible."""
    path = tmp_path_factory.mktemp("model") / "tiny"
    shutil.copytree(tiny_qwen_image, path)
    cfg_path = path / "vae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    cfg_path.write_text(json.dumps(cfg))
    return str(path)


def _config(source: str, output: str, model: str) -> PrecacheConfig:
    return PrecacheConfig(
        data=DatasetConfig(source=source, resolution=32, min_size=16, bad_share_limit=0.5, decode_num_cpus=0.5),
        encode=EncodeConfig(model_path=model, device="cpu", dtype="float32", batch_size=8, concurrency=1,
                            num_gpus=0.0, max_sequence_length=512),
        output=output, part_rows=16)


@pytest.fixture(scope="module")
def cached(s3_server, ray_local, tiny_model):
    """24 good digits + 4 bad ones in 3 parquet shards on S3, precached to another S3 prefix."""
    fs = s3_server.filesystem()
    src = s3_server.create_bucket("precache-src") + "/digits"
    out = s3_server.create_bucket("precache-out") + "/cache"
    info = write_digits_dataset(src, "parquet", n=24, shards=3, size=32, filesystem=fs,
                                bad={UNDECODABLE: 1, NO_CAPTION: 1, EMPTY_CAPTION: 1, TOO_SMALL: 1})
    cfg = _config(src, out, tiny_model)
    result = run_precache(cfg, filesystem_in=fs, filesystem_out=fs)
    return {"cfg": cfg, "fs": fs, "info": info, "result": result}


def test_manifest_records_counts_shapes_and_model(cached, tiny_model):
    m = cached["result"].manifest
    assert cached["result"].encoded_shards == ["shard-00000", "shard-00001", "shard-00002"]
    assert m.complete and m.rows == 24
    assert m.counts == {"rows": 24, "seen": 28,
                        "skipped": {EMPTY_CAPTION: 1, NO_CAPTION: 1, TOO_SMALL: 1, UNDECODABLE: 1}}
    assert m.shards[0]["skipped"] == {UNDECODABLE: 1, NO_CAPTION: 1, EMPTY_CAPTION: 1, TOO_SMALL: 1}
    assert [s["rows"] for s in m.shards] == [8, 8, 8] and m.shards[1]["skipped"] == {}
    assert m.latent_shapes == [[4, 8, 8]]  # z_dim 4; the tiny VAE downsamples by 4 (the real one by 8)
    assert m.embed_dim == 16 and m.dtype == "float32"
    assert m.model["path"] == tiny_model and m.model["latents_mean"] == LATENTS_MEAN
    assert m.uncond["prompt"] == UNCOND_PROMPT and m.uncond["length"] > 0
    assert m.source["format"] == "parquet" and m.source["shards"] == 3


def test_cache_equals_encoding_directly_with_diffusers(cached, tiny_model):
    from diffusers import QwenImagePipeline

    cfg, fs = cached["cfg"], cached["fs"]
    table, manifest = read_cache_table(cfg.output, fs)
    assert table.num_rows == 24
    decoded = {key: (img, text) for key, img, text in iter_decoded(cfg.data, filesystem=fs)}
    pipe = QwenImagePipeline.from_pretrained(tiny_model, transformer=None, scheduler=None)
    mean = torch.tensor(LATENTS_MEAN).view(1, 4, 1, 1)
    std = torch.tensor(LATENTS_STD).view(1, 4, 1, 1)
    rows = table.slice(0, 6).to_pylist()
    with torch.no_grad():
        for row in rows:
            img, text = decoded[row["key"]]
            assert row["text"] == text
            x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
            want = (pipe.vae.encode(x[:, :, None]).latent_dist.mean[:, :, 0] - mean) / std
            got = bytes_to_tensor(row["latents"], "float32", row["latents_shape"])
            torch.testing.assert_close(got, want[0], atol=1e-5, rtol=1e-5)
            emb, _ = pipe.encode_prompt(text, device="cpu", max_sequence_length=512)
            got_emb = bytes_to_tensor(row["prompt_embeds"], "float32", (row["prompt_len"], -1))
            torch.testing.assert_close(got_emb, emb[0], atol=1e-5, rtol=1e-5)
        uncond = load_uncond(cfg.output, fs)
        emb, _ = pipe.encode_prompt(UNCOND_PROMPT, device="cpu", max_sequence_length=512)
    torch.testing.assert_close(uncond["prompt_embeds"], emb)
    assert uncond["prompt_mask"].shape == emb.shape[:2] and uncond["prompt_mask"].eq(1).all()


def test_cache_reads_back_as_training_batches(cached):
    cfg, fs = cached["cfg"], cached["fs"]
    data = open_training_data(DatasetConfig(source=cfg.output), batch_size=5, filesystem=fs)
    assert data.spec.kind == "cache" and not data.spec.equalize
    batches = list(iter_training_batches(data.dataset, data.spec))
    assert len(batches) == 4  # 24 rows, drop_last
    table, _ = read_cache_table(cfg.output, fs)
    lengths = dict(zip(table.column("key").to_pylist(), table.column("prompt_len").to_pylist()))
    for b in batches:
        assert set(b) == {"latents", "prompt_embeds", "prompt_mask"}
        assert b["latents"].shape == (5, 4, 8, 8) and b["latents"].dtype == torch.float32
        assert b["prompt_embeds"].dtype == torch.float32 and b["prompt_mask"].dtype == torch.int64
        assert b["prompt_embeds"].shape[:2] == b["prompt_mask"].shape and b["prompt_embeds"].shape[2] == 16
        assert b["prompt_mask"].sum(1).max() == b["prompt_mask"].shape[1]  # padded to the batch's longest
        padded = b["prompt_embeds"][b["prompt_mask"] == 0]
        assert padded.abs().sum() == 0
    # the digits captions alternate between a short and a long template, so some rows were padded
    assert any(b["prompt_mask"].eq(0).any() for b in batches)
    # 20 of the 24 rows are served (4 batches of 5); their prompt lengths are the cached ones
    served = sorted(int(n) for b in batches for n in b["prompt_mask"].sum(1))
    assert len(served) == 20 and set(served) <= set(lengths.values())


def _load_job():
    spec = importlib.util.spec_from_file_location("precache_job", ROOT / "jobs" / "precache.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _part_files(fs, out: str) -> dict[str, int]:
    return {i.path: i.mtime_ns for i in fs.get_file_info(FileSelector(f"{out}/{PARTS_DIR}", recursive=True))
            if i.type == FileType.File}


def test_resume_skips_finished_shards_and_redoes_only_a_lost_one(cached, s3_env, tmp_path, capsys):
    cfg, fs = cached["cfg"], cached["fs"]
    out = cfg.output.removeprefix("s3://")
    yaml_path = tmp_path / "precache.yaml"
    yaml_path.write_text(dump_yaml(cfg))
    job = _load_job()
    parts_before = _part_files(fs, out)

    # 1) everything is cached: the job (run through its entry point) encodes nothing. (--preset tiny:
    # a YAML "{}" cannot empty the default preset's decode_resources={twinflow_data: 1}.)
    args = ["--preset", "tiny", "--config", str(yaml_path)]
    assert job.main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["encoded_shards"] == 0 and summary["reused_shards"] == 3 and summary["rows"] == 24

    # 2) a crash after shard-00001's parts were written but before its commit marker: its marker is
    #    gone and a half-written part lies there. And shard-00002's parts were deleted by hand (its
    #    marker left behind). Only these two are redone; the stray part is not counted.
    fs.delete_file(f"{out}/{MARKERS_DIR}/shard-00001.json")
    with fs.open_output_stream(f"{out}/{PARTS_DIR}/shard-00001/part-halfwritten.parquet") as f:
        f.write(b"PAR1 truncated")
    fs.delete_dir(f"{out}/{PARTS_DIR}/shard-00002")
    assert job.main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["encoded_shards"] == 2 and summary["reused_shards"] == 1 and summary["rows"] == 24
    parts_after = _part_files(fs, out)
    assert not any("halfwritten" in p for p in parts_after)
    for path, mtime in parts_before.items():
        if "/shard-00000/" in path:
            assert parts_after[path] == mtime  # untouched
        else:
            assert path not in parts_after  # redone under new part names
    assert any("/shard-00002/" in p for p in parts_after)
    ds, manifest = read_latent_cache(cfg.output, fs)
    assert ds.count() == 24 and manifest.counts == cached["result"].manifest.counts


def test_other_settings_on_the_same_output_are_refused(cached):
    cfg = cached["cfg"]
    other = _config(cfg.data.source, cfg.output, cfg.encode.model_path)
    other.data.resolution = 64
    with pytest.raises(ConfigError, match=r"^output: .* other settings \(changed: data\).*overwrite=true"):
        run_precache(other, filesystem_in=cached["fs"], filesystem_out=cached["fs"])


def test_job_stops_on_a_bad_shard_and_names_it(tmp_path, tiny_model, ray_local, capsys):
    src = tmp_path / "src"
    # shard-00001: 4 unusable of 12 samples (33 %) > data.bad_share_limit 0.2
    write_digits_dataset(str(src), "parquet", n=16, shards=2, bad={UNDECODABLE: 2, NO_CAPTION: 2}, bad_shard=1)
    out = tmp_path / "out"
    job = _load_job()
    code = job.main(["--preset", "tiny", "--set", f"data.source={src}", "--set", f"output={out}",
                     "--set", f"encode.model_path={tiny_model}", "--set", "data.resolution=32",
                     "--set", "data.bad_share_limit=0.2"])
    err = capsys.readouterr().err
    assert code == 2  # an input error, like every job's (the training job prints the same line)
    assert "error: shard " in err and "shard-00001.parquet: 4 of 12 samples unusable" in err
    assert "no_caption=2, undecodable=2" in err and "data.bad_share_limit=0.2" in err
    assert not (out / "manifest.json").exists() and not (out / "_shards" / "shard-00001.json").exists()


def test_cli_dry_run_prints_plan_and_config_errors_exit_2(tmp_path):
    src = tmp_path / "src"
    write_digits_dataset(str(src), "webdataset", n=4, shards=2)
    run = [sys.executable, str(ROOT / "jobs" / "precache.py"), "--preset", "tiny",
           "--set", f"data.source={src}", "--set", f"output={tmp_path / 'out'}"]
    ok = subprocess.run(run + ["--dry-run"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    plan = json.loads(ok.stdout.strip().splitlines()[-1])["plan"]
    assert plan["format"] == "webdataset" and plan["shards"] == 2 and plan["to_encode"] == 2
    bad = subprocess.run(run + ["--set", "encode.batch_size=0", "--dry-run"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "config error: encode.batch_size: must be >= 1"


def test_equal_batches_per_rank_through_torchtrainer(cached, tmp_path, tiny_model):
    """2 Train workers (0.5 CPU each: Ray Data needs CPUs too) read the cache and bucketed raw data."""
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cache = open_training_data(DatasetConfig(source=cached["cfg"].output), batch_size=4, filesystem=cached["fs"])
    raw_uri = str(tmp_path / "bucketed")
    write_digits_dataset(raw_uri, "parquet", n=30, shards=2, size=32, aspects=(1.0, 2.0, 0.5))
    raw = open_training_data(DatasetConfig(source=raw_uri, resolution=64, crop="buckets", min_size=16,
                                           decode_num_cpus=0.5),
                             batch_size=2, model_path=tiny_model, encode_device="cpu", encode_dtype="float32",
                             max_sequence_length=512)
    assert raw.spec.equalize

    def loop(config):
        import ray.train
        import torch.distributed as dist

        from twinflow.data import iter_training_batches

        seen = {}
        for name in ("train", "bucketed"):
            spec = config[name]
            shapes = []
            for batch in iter_training_batches(ray.train.get_dataset_shard(name), spec):
                b = batch["latents"].shape[0]
                assert batch["prompt_embeds"].shape[0] == b and batch["prompt_mask"].shape[0] == b
                shapes.append(list(batch["latents"].shape))
            seen[name] = shapes
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, seen)
        # Train V2 keeps metrics only with a checkpoint: rank 0 reports one holding every rank's counts
        checkpoint = None
        if dist.get_rank() == 0:
            import tempfile
            from pathlib import Path

            from ray.train import Checkpoint

            out = Path(tempfile.mkdtemp())
            (out / "per_rank.json").write_text(json.dumps(gathered))
            checkpoint = Checkpoint.from_directory(str(out))
        ray.train.report({"ranks": len(gathered)}, checkpoint=checkpoint)

    trainer = TorchTrainer(
        loop, train_loop_config={"train": cache.spec, "bucketed": raw.spec},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        datasets={"train": cache.dataset, "bucketed": raw.dataset},
        dataset_config=DataConfig(datasets_to_split=["train", "bucketed"]),
        run_config=RunConfig(name="ingest", storage_path=str(tmp_path / "runs")))
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        per_rank = json.loads((Path(d) / "per_rank.json").read_text())
    assert len(per_rank) == 2
    # cache: 24 rows -> 12 per rank -> 3 batches of 4 on each rank
    assert [len(r["train"]) for r in per_rank] == [3, 3]
    assert all(shape == [4, 4, 8, 8] for r in per_rank for shape in r["train"])
    # buckets: every batch is one bucket; ranks stop together
    counts = [len(r["bucketed"]) for r in per_rank]
    assert counts[0] == counts[1] > 0
    shapes = {tuple(s) for r in per_rank for s in r["bucketed"]}
    assert all(s[0] == 2 and s[1] == 4 for s in shapes)
    assert len({s[2:] for s in shapes}) > 1  # more than one bucket was used
    skip = {s["shard"]: s for s in raw.skip_counts()}
    assert sum(s["ok"] for s in skip.values()) == 30 and all(s["skipped"] == {} for s in skip.values())
