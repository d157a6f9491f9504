"""Pre-caching: raw image-text shards -> VAE latents + prompt embeddings on S3/local (cache.py layout).

Ray Data pipeline, three stages with their own resources, streaming end to end:

    decode   from_items(shards) -> map_batches(decode shard)       CPU tasks (data.decode_*)
    encode   map_batches(EncodeActor, concurrency=N, num_gpus=g)   actor pool; each actor loads
                                                                   only VAE + text encoder once
    write    map_batches(write parts)                              small CPU tasks, parquet parts

The driver consumes the write stage's receipts (shard, part, rows) and commits a source shard
(its marker file) once all its usable rows are written — the count of usable rows comes from the
decode tasks through a ledger actor. Resume = skip shards whose marker exists with the same shard
and settings fingerprints; the parts of any other shard are wiped and redone. The unconditional
prompt is encoded by the encode actors (the text encoder is loaded there anyway) and stored as
uncond.safetensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from twinflow.config.errors import ConfigError
from twinflow.data.cache import (MANIFEST, MARKERS_DIR, PARTS_DIR, SETTINGS_FILE, UNCOND_FILE, LatentCacheManifest,
                                 ShardEntry, tensor_to_bytes, uncond_bytes, write_parts_udf)
from twinflow.data.config import PrecacheConfig
from twinflow.data.encode import PipelineEncoder
from twinflow.data.fs import (DataSourceError, delete_dir_if_exists, describe, exists, filesystem_for, join,
                              list_files, read_bytes, write_bytes_atomic)
from twinflow.data.ingest import (find_bad_data_error, new_ledger, read_image_text, summarize,
                                  warn_missing_resources)
from twinflow.data.sources import BadDataError, Shard, detect_format, list_shards
from twinflow.data.transforms import to_model_pixels
from twinflow.files import check_model_folder


def settings_of(cfg: PrecacheConfig) -> dict:
    """Everything that changes cached values; a different fingerprint means a different cache."""
    d = cfg.data
    return {"data": {"format": d.format, "image_column": d.image_column, "text_column": d.text_column,
                     "image_extensions": list(d.image_extensions), "caption_extensions": list(d.caption_extensions),
                     "caption_json_field": d.caption_json_field, "files_per_shard": d.files_per_shard,
                     "resolution": d.resolution, "crop": d.crop, "bucket_max_aspect": d.bucket_max_aspect,
                     "min_size": d.min_size},
            "model_path": cfg.encode.model_path, "encode_dtype": cfg.encode.dtype,
            "max_sequence_length": cfg.encode.max_sequence_length, "uncond_prompt": cfg.encode.uncond_prompt,
            "cache_dtype": cfg.cache_dtype}


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- Ray stages


class EncodeActor:
    """map_batches callable class: loads the encoders once, turns decoded rows into cache rows.

    With ``uncond`` = (filesystem, path, prompt) it also writes the unconditional condition when
    that file is missing: the text encoder is loaded here anyway (several actors may write the
    same bytes; the write is atomic).
    """

    def __init__(self, model_path: str, device: str, dtype: str, max_sequence_length: int, cache_dtype: str,
                 uncond: tuple | None = None):
        self.encoder = PipelineEncoder(model_path, device=device, dtype=dtype, max_sequence_length=max_sequence_length)
        self.cache_dtype = cache_dtype
        if uncond is not None:
            fs, path, prompt = uncond
            if not exists(fs, path):
                write_bytes_atomic(fs, path, uncond_bytes(self.encoder.uncond(prompt)))

    def __call__(self, batch: dict) -> dict:
        images, texts = batch["image"], [str(t) for t in batch["text"]]
        n = len(texts)
        latents: list = [None] * n
        shapes = [tuple(images[i].shape) for i in range(n)]
        for shape in dict.fromkeys(shapes):  # buckets: one VAE call per image shape
            idx = [i for i, s in enumerate(shapes) if s == shape]
            z = self.encoder.encode_images(to_model_pixels([images[i] for i in idx]))
            for i, zi in zip(idx, z):
                latents[i] = zi
        embeds = self.encoder.encode_prompts(texts)
        lat_bytes = np.empty(n, dtype=object)
        emb_bytes = np.empty(n, dtype=object)
        lat_bytes[:] = [tensor_to_bytes(z, self.cache_dtype) for z in latents]
        emb_bytes[:] = [tensor_to_bytes(e, self.cache_dtype) for e in embeds]
        return {"key": np.asarray(batch["key"], dtype=object), "shard": np.asarray(batch["shard"], dtype=object),
                "text": np.asarray(texts, dtype=object), "latents": lat_bytes,
                "latents_shape": np.asarray([list(z.shape) for z in latents], dtype=np.int32),
                "prompt_embeds": emb_bytes, "prompt_len": np.asarray([e.shape[0] for e in embeds], dtype=np.int32),
                "embed_dim": np.asarray([e.shape[1] for e in embeds], dtype=np.int32)}


def _encode_uncond(model_path: str, device: str, dtype: str, max_sequence_length: int, prompt: str) -> bytes:
    enc = PipelineEncoder(model_path, device=device, dtype=dtype, max_sequence_length=max_sequence_length,
                           load_vae=False)
    return uncond_bytes(enc.uncond(prompt))


# ----------------------------------------------------------------------------- driver


@dataclass
class PrecacheResult:
    manifest: LatentCacheManifest
    output: str
    encoded_shards: list[str]
    reused_shards: list[str]
    seconds: float

    def summary(self) -> dict:
        return {"output": self.output, "rows": self.manifest.rows, "counts": self.manifest.counts,
                "encoded_shards": len(self.encoded_shards), "reused_shards": len(self.reused_shards),
                "latent_shapes": self.manifest.latent_shapes, "embed_dim": self.manifest.embed_dim,
                "seconds": round(self.seconds, 2)}


def resolve_model_path(path: str, build: bool = True) -> str:
    """``"tiny"`` -> the random-weight test model's folder (built on first use); other paths unchanged."""
    from twinflow.named import resolve_model

    return resolve_model(path, build=build)


def vae_info(model_path: str) -> dict:
    """The model's family and VAE settings (recorded in the manifest; the family's latent normalisation
    reads them); DataSourceError naming the path when it is no pipeline folder of a known family."""
    from twinflow.models.families import backbone_for

    try:
        family = backbone_for(model_path)
        config = family.vae_class().load_config(model_path, subfolder="vae")
    except (OSError, ValueError, ConfigError) as exc:
        raise DataSourceError(f"encode.model_path={model_path}: not a readable pipeline folder or hub id of a known "
                              f"family ({str(exc).splitlines()[0]})") from exc
    keep = ("latents_mean", "latents_std", "z_dim", "scaling_factor", "latent_channels")
    return {"path": model_path, "family": family.name, "uncond_prompt": family.uncond_prompt,
            **{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in config.items() if k in keep}}


def _claim_output(fs, root: str, settings: dict, fp: str, overwrite: bool) -> None:
    """Record which settings own this prefix; refuse to mix caches made with different ones."""
    path = join(root, SETTINGS_FILE)
    if exists(fs, path):
        old = json.loads(read_bytes(fs, path))
        if old.get("fingerprint") != fp:
            if not overwrite:
                changed = sorted(k for k in set(old.get("settings", {})) | set(settings)
                                 if old.get("settings", {}).get(k) != settings.get(k))
                raise ConfigError(f"output: {describe(fs, root)} holds a cache made with other settings "
                                  f"(changed: {', '.join(changed)}); choose a new output or --set overwrite=true")
            delete_dir_if_exists(fs, root)
    write_bytes_atomic(fs, path, json.dumps({"fingerprint": fp, "settings": settings}, indent=1).encode())


def _read_markers(fs, root: str) -> dict[str, dict]:
    markers = {}
    mdir = join(root, MARKERS_DIR)
    if not exists(fs, mdir):
        return markers
    for info in list_files(fs, mdir, recursive=False):
        if info.path.endswith(".json"):
            entry = json.loads(read_bytes(fs, info.path))
            markers[entry["id"]] = entry
    return markers


def _commit(fs, root: str, shard: Shard, stats: dict, parts: list[dict], fp: str) -> dict:
    shapes = sorted({tuple(s) for p in parts for s in p["shapes"]})
    dims = {p["embed_dim"] for p in parts}
    entry = ShardEntry(id=shard.id, source=shard.uri, fingerprint=shard.fingerprint, rows=sum(p["rows"] for p in parts),
                       seen=stats["seen"], skipped=stats["skipped"],
                       parts=[{"path": p["path"], "rows": p["rows"]} for p in parts],
                       latent_shapes=[list(s) for s in shapes], embed_dim=dims.pop() if dims else None,
                       max_prompt_len=max((p["max_prompt_len"] for p in parts), default=0), settings_fingerprint=fp)
    marker = asdict(entry)
    write_bytes_atomic(fs, join(root, MARKERS_DIR, f"{shard.id}.json"), json.dumps(marker, indent=1).encode())
    return marker


def _existing_parts(fs, root: str) -> set[str]:
    pdir = join(root, PARTS_DIR)
    if not exists(fs, pdir):
        return set()
    return {info.path[len(root):].lstrip("/") for info in list_files(fs, pdir)}


def _done_shards(shards: list[Shard], markers: dict[str, dict], fp: str, parts: set[str]) -> set[str]:
    """Shards whose commit marker matches the shard's files and the run's settings, and whose
    part files are all still there (a shard whose parts were deleted is redone)."""
    return {s.id for s in shards if s.id in markers and markers[s.id]["fingerprint"] == s.fingerprint
            and markers[s.id].get("settings_fingerprint") == fp
            and all(p["path"] in parts for p in markers[s.id]["parts"])}


def plan_precache(cfg: PrecacheConfig, *, filesystem_in=None, filesystem_out=None) -> dict:
    """What a run would do, without Ray or models: shards found, already cached, to encode."""
    fs_in, root_in = filesystem_for(cfg.data.source, filesystem_in)
    fs_out, root = filesystem_for(cfg.output, filesystem_out)
    shards = list_shards(cfg.data, fs_in, root_in)
    settings = settings_of(cfg)
    settings["model_path"] = resolve_model_path(cfg.encode.model_path, build=False)
    done = _done_shards(shards, _read_markers(fs_out, root), fingerprint(settings), _existing_parts(fs_out, root))
    return {"source": cfg.data.source, "format": detect_format(cfg.data, fs_in, root_in), "shards": len(shards),
            "cached": len(done), "to_encode": len(shards) - len(done), "output": cfg.output}


def run_precache(cfg: PrecacheConfig, *, filesystem_in=None, filesystem_out=None,
                 log: Callable[[str], None] = print) -> PrecacheResult:
    """Encode every not-yet-committed shard of ``cfg.data.source`` into ``cfg.output``; needs Ray initialised."""
    import ray

    t0 = time.perf_counter()
    model_path = resolve_model_path(cfg.encode.model_path)
    model_info = vae_info(model_path)  # fails fast on a wrong model path, before any encoding
    if cfg.encode.uncond_prompt is None:  # the family's ∅, written into the settings and the manifest
        cfg = dataclasses.replace(cfg, encode=dataclasses.replace(cfg.encode, uncond_prompt=model_info["uncond_prompt"]))
    fs_in, root_in = filesystem_for(cfg.data.source, filesystem_in)
    fs_out, root = filesystem_for(cfg.output, filesystem_out)
    source_format = detect_format(cfg.data, fs_in, root_in)
    shards = list_shards(cfg.data, fs_in, root_in)
    settings = settings_of(cfg)
    settings["model_path"] = model_path
    fp = fingerprint(settings)
    check_model_folder(model_path)  # and on a truncated weight file
    _claim_output(fs_out, root, settings, fp, cfg.overwrite)

    markers = _read_markers(fs_out, root)
    done = _done_shards(shards, markers, fp, _existing_parts(fs_out, root))
    pending = [s for s in shards if s.id not in done]
    log(f"precache: {len(shards)} shards in {cfg.data.source}; {len(done)} already cached, {len(pending)} to encode")

    num_gpus = cfg.encode.num_gpus
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    device = cfg.encode.device if cfg.encode.device != "auto" else ("cuda" if num_gpus > 0 else "cpu")
    actor_args = {"num_gpus": num_gpus, "num_cpus": cfg.encode.num_cpus}
    if cfg.encode.resources:
        actor_args["resources"] = dict(cfg.encode.resources)
        warn_missing_resources(cfg.encode.resources, "encode.resources")

    if pending:
        if exists(fs_out, join(root, MANIFEST)):
            fs_out.delete_file(join(root, MANIFEST))  # the cache is incomplete until this run ends
        for s in pending:
            delete_dir_if_exists(fs_out, join(root, PARTS_DIR, s.id))
            if s.id in markers:
                fs_out.delete_file(join(root, MARKERS_DIR, f"{s.id}.json"))
                del markers[s.id]

    uncond_path = join(root, UNCOND_FILE)
    if pending:
        _encode_pending(cfg, pending, fs_in, fs_out, root, fp, model_path, device, actor_args, markers, log)
    if not exists(fs_out, uncond_path):  # nothing to encode, but the unconditional file was lost
        task = ray.remote(**actor_args)(_encode_uncond)
        write_bytes_atomic(fs_out, uncond_path, ray.get(task.remote(
            model_path, device, cfg.encode.dtype, cfg.encode.max_sequence_length, cfg.encode.uncond_prompt)))

    manifest = _write_manifest(cfg, shards, source_format, fs_out, root, markers, fp, settings, model_info)
    return PrecacheResult(manifest=manifest, output=cfg.output, encoded_shards=[s.id for s in pending],
                          reused_shards=sorted(done), seconds=time.perf_counter() - t0)


def _encode_pending(cfg, pending, fs_in, fs_out, root, fp, model_path, device, actor_args, markers, log) -> None:
    import ray

    by_id = {s.id: s for s in pending}
    ledger = new_ledger()
    ds = read_image_text(cfg.data, filesystem=fs_in, shards=pending, ledger=ledger)
    ds = ds.map_batches(EncodeActor, batch_size=cfg.encode.batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=cfg.encode.concurrency),
                        fn_constructor_kwargs={"model_path": model_path, "device": device, "dtype": cfg.encode.dtype,
                                               "max_sequence_length": cfg.encode.max_sequence_length,
                                               "cache_dtype": cfg.cache_dtype,
                                               "uncond": (fs_out, join(root, UNCOND_FILE), cfg.encode.uncond_prompt)},
                        **actor_args)
    ds = ds.map_batches(write_parts_udf, batch_size=cfg.part_rows, batch_format="pyarrow",
                        fn_kwargs={"fs": fs_out, "root": root}, num_cpus=cfg.write_num_cpus)

    parts: dict[str, list[dict]] = defaultdict(list)
    open_ids = set(by_id)

    def commit_ready(final: bool) -> None:
        if not open_ids:
            return
        stats = ray.get(ledger.get.remote(sorted(open_ids)))
        for sid, st in stats.items():
            if st is None:
                if final:
                    raise RuntimeError(f"shard {by_id[sid].uri}: no decode report arrived; re-run to redo it")
                continue
            written = sum(p["rows"] for p in parts[sid])
            if written > st["ok"]:
                raise RuntimeError(f"shard {by_id[sid].uri}: {written} rows written but {st['ok']} decoded "
                                   f"(a retried task duplicated rows); re-run to redo the shard")
            if written == st["ok"]:
                markers[sid] = _commit(fs_out, root, by_id[sid], st, parts[sid], fp)
                open_ids.discard(sid)
                log(f"precache: committed {sid} ({written} rows, skipped {st['skipped'] or 'none'})")
            elif final:
                raise RuntimeError(f"shard {by_id[sid].uri}: {written} of {st['ok']} rows written at the end of "
                                   f"the run; re-run to redo the shard")

    try:
        for receipt in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(receipt["shard"])):
                parts[str(receipt["shard"][i])].append(
                    {"path": str(receipt["path"][i]), "rows": int(receipt["rows"][i]),
                     "shapes": json.loads(receipt["shapes"][i]), "embed_dim": int(receipt["embed_dim"][i]),
                     "max_prompt_len": int(receipt["max_prompt_len"][i])})
            commit_ready(final=False)
        commit_ready(final=True)  # shards with no usable rows, and the last ones
    except Exception as exc:
        bad = find_bad_data_error(exc)
        if bad is not None:
            raise BadDataError(str(bad).splitlines()[0]) from None
        raise
    finally:
        ray.kill(ledger)


def _write_manifest(cfg, shards, source_format, fs_out, root, markers, fp, settings,
                    model_info: dict) -> LatentCacheManifest:
    entries = [markers[s.id] for s in shards]
    shapes = sorted({tuple(x) for e in entries for x in e["latent_shapes"]})
    dims = {e["embed_dim"] for e in entries if e["embed_dim"] is not None}
    if len(dims) > 1:
        raise RuntimeError(f"cache {cfg.output}: shards disagree on the embedding width {sorted(dims)}")
    from safetensors.torch import load as load_safetensors

    uncond = load_safetensors(read_bytes(fs_out, join(root, UNCOND_FILE)))
    totals = summarize([{"shard": e["id"], "uri": e["source"], "seen": e["seen"], "ok": e["rows"],
                         "skipped": e["skipped"]} for e in entries])
    manifest = LatentCacheManifest(
        dtype=cfg.cache_dtype,
        source={"uri": cfg.data.source, "format": source_format, "shards": len(shards),
                "fingerprint": fingerprint([s.fingerprint for s in shards])},
        model=model_info,
        settings={**settings, "fingerprint": fp},
        latent_shapes=[list(s) for s in shapes],
        embed_dim=dims.pop() if dims else int(uncond["prompt_embeds"].shape[-1]),
        max_prompt_len=max((e["max_prompt_len"] for e in entries), default=0),
        uncond={"path": UNCOND_FILE, "prompt": cfg.encode.uncond_prompt,
                "length": int(uncond["prompt_embeds"].shape[1])},
        counts={"rows": totals["ok"], "seen": totals["seen"], "skipped": totals["skipped"]},
        shards=entries)
    write_bytes_atomic(fs_out, join(root, MANIFEST), manifest.to_json().encode())
    return manifest
