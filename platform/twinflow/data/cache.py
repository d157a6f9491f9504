"""The latent cache written by jobs/precache.py: parquet parts + per-shard commit markers + manifest.

Layout under the output prefix (local or s3://):

    manifest.json                 what the cache holds (below); written last, atomically
    uncond.safetensors            the unconditional condition: prompt_embeds [1, L, D], prompt_mask [1, L]
    _settings.json                settings fingerprint of the run that owns this prefix (resume check)
    _shards/<shard-id>.json       commit marker of one finished source shard (its parts and counts)
    parts/<shard-id>/part-*.parquet   the rows, CACHE_SCHEMA

A shard counts as done only when its marker exists; markers are written after all its parts, so a
crash never leaves a half shard counted (its parts directory is wiped when it is redone).
Paths inside markers and the manifest are relative to the prefix: a cache copied from local disk
to S3 (or back) stays valid.

Row schema (CACHE_SCHEMA), tensors as raw little-endian bytes in the manifest's ``dtype``:
    key            string       source sample id "<shard-id>/<row or member>"
    text           string       the caption
    latents        binary       [C, H, W] normalised VAE posterior mean
    latents_shape  list<int32>  [C, H, W]
    prompt_embeds  binary       [L, D] text-encoder embedding, no padding
    prompt_len     int32        L (D is the manifest's embed_dim)

manifest.json (format "twinflow-latent-cache", version 1)::

    {"format", "version", "complete": true, "dtype": "float32",
     "source": {"uri", "format", "fingerprint", "shards"},
     "model": {"path", "family", "uncond_prompt", + the family's VAE settings: latents_mean, latents_std,
               z_dim (Qwen-Image) or scaling_factor, latent_channels (SANA)},
     "settings": {...resolution, crop, ..., "fingerprint"},
     "latent_shapes": [[C, H, W], ...], "embed_dim": D, "max_prompt_len": L,
     "uncond": {"path": "uncond.safetensors", "prompt": the family's ∅ ("Generate an image.", ""), "length": L},
     "counts": {"rows", "seen", "skipped": {reason: n}},
     "shards": [{"id", "source", "fingerprint", "rows", "seen", "skipped", "parts": [{"path", "rows"}]}]}
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from twinflow.data.fs import DataSourceError, describe, exists, filesystem_for, join, read_bytes, write_bytes_atomic

CACHE_FORMAT = "twinflow-latent-cache"
CACHE_VERSION = 1
MANIFEST = "manifest.json"
UNCOND_FILE = "uncond.safetensors"
SETTINGS_FILE = "_settings.json"
MARKERS_DIR = "_shards"
PARTS_DIR = "parts"

CACHE_SCHEMA = pa.schema([
    pa.field("key", pa.string()),
    pa.field("text", pa.string()),
    pa.field("latents", pa.binary()),
    pa.field("latents_shape", pa.list_(pa.int32())),
    pa.field("prompt_embeds", pa.binary()),
    pa.field("prompt_len", pa.int32()),
])


# ----------------------------------------------------------------------------- tensors <-> bytes


# torch is imported inside the functions: the write tasks of precache import this module and need
# only pyarrow (a torch import costs seconds per fresh Ray worker process).


def _torch_dtype(name: str):
    from twinflow.dtypes import torch_dtype

    return torch_dtype(name)


def tensor_to_bytes(t, dtype: str) -> bytes:
    import torch

    return t.detach().to("cpu", _torch_dtype(dtype)).contiguous().view(torch.uint8).numpy().tobytes()


def bytes_to_tensor(data: bytes, dtype: str, shape):
    """float32 tensor of ``shape`` from raw bytes of ``dtype`` (bf16 included, which numpy lacks)."""
    import torch

    t = torch.frombuffer(bytearray(data), dtype=_torch_dtype(dtype))
    return t.view(*[int(s) for s in shape]).float()


# ----------------------------------------------------------------------------- manifest


@dataclass
class ShardEntry:
    id: str
    source: str
    fingerprint: str
    rows: int
    seen: int
    skipped: dict[str, int]
    parts: list[dict]          # [{"path": "parts/<id>/part-....parquet", "rows": n}]
    latent_shapes: list[list[int]] = field(default_factory=list)
    embed_dim: int | None = None
    max_prompt_len: int = 0
    settings_fingerprint: str = ""


@dataclass
class LatentCacheManifest:
    dtype: str
    source: dict
    model: dict
    settings: dict
    latent_shapes: list[list[int]]
    embed_dim: int | None
    max_prompt_len: int
    uncond: dict
    counts: dict
    shards: list[dict]
    complete: bool = True
    format: str = CACHE_FORMAT
    version: int = CACHE_VERSION

    @property
    def rows(self) -> int:
        return int(self.counts.get("rows", 0))

    def part_paths(self) -> list[str]:
        """Relative paths of every part file, in shard order."""
        return [p["path"] for s in self.shards for p in s["parts"]]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False)

    @staticmethod
    def from_json(text: str, where: str = "manifest") -> "LatentCacheManifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataSourceError(f"{where}: not valid JSON ({exc})") from exc
        if d.get("format") != CACHE_FORMAT:
            raise DataSourceError(f"{where}: not a twinflow latent cache manifest (format={d.get('format')!r})")
        if d.get("version") != CACHE_VERSION:
            raise DataSourceError(f"{where}: cache version {d.get('version')} but this code reads {CACHE_VERSION}; "
                                  f"re-run jobs/precache.py into a new prefix")
        return LatentCacheManifest(**d)


def read_manifest(uri: str, filesystem=None, require_complete: bool = True):
    """(manifest, filesystem, root path) of the cache at ``uri``."""
    fs, root = filesystem_for(uri, filesystem)
    path = join(root, MANIFEST)
    if not exists(fs, path):
        raise DataSourceError(f"{describe(fs, root)}: no {MANIFEST}; is this the output of jobs/precache.py "
                              f"(and did it finish)?")
    manifest = LatentCacheManifest.from_json(read_bytes(fs, path).decode(), describe(fs, path))
    if require_complete and not manifest.complete:
        raise DataSourceError(f"{describe(fs, root)}: the cache is incomplete; re-run jobs/precache.py to finish it")
    return manifest, fs, root


def load_uncond(uri: str, filesystem=None) -> dict:
    """The cached unconditional condition {"prompt_embeds": [1, L, D] float32, "prompt_mask": [1, L] int64}."""
    from safetensors.torch import load as load_safetensors

    manifest, fs, root = read_manifest(uri, filesystem)
    tensors = load_safetensors(read_bytes(fs, join(root, manifest.uncond["path"])))
    return {"prompt_embeds": tensors["prompt_embeds"].float(), "prompt_mask": tensors["prompt_mask"].long()}


def uncond_bytes(cond: dict) -> bytes:
    from safetensors.torch import save as save_safetensors

    return save_safetensors({"prompt_embeds": cond["prompt_embeds"].float().contiguous().cpu(),
                             "prompt_mask": cond["prompt_mask"].long().contiguous().cpu()})


# ----------------------------------------------------------------------------- parts


def write_part(fs, path: str, table: pa.Table) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table.cast(CACHE_SCHEMA), buf)
    write_bytes_atomic(fs, path, buf.getvalue())


def write_parts_udf(table, *, fs, root: str) -> dict:
    """Ray Data UDF of precache's write stage: one part per shard present in this pyarrow batch;
    returns receipts, one row per part: shard, path (relative), rows, shapes (JSON), embed_dim,
    max_prompt_len."""
    import pyarrow as pa
    import pyarrow.compute as pc

    receipts: dict[str, list] = {k: [] for k in ("shard", "path", "rows", "shapes", "embed_dim", "max_prompt_len")}
    shard_col = table.column("shard")
    for shard_id in pc.unique(shard_col).to_pylist():
        part = table.filter(pc.equal(shard_col, pa.scalar(shard_id)))
        # latents_shape arrives as Ray's tensor extension type; store a plain list<int32>
        shapes = [[int(x) for x in s] for s in part.column("latents_shape").to_pylist()]
        out = pa.table({"key": part.column("key"), "text": part.column("text"), "latents": part.column("latents"),
                        "latents_shape": pa.array(shapes, pa.list_(pa.int32())),
                        "prompt_embeds": part.column("prompt_embeds"), "prompt_len": part.column("prompt_len")})
        rel = f"{PARTS_DIR}/{shard_id}/part-{uuid.uuid4().hex[:12]}.parquet"
        write_part(fs, join(root, rel), out)
        dims = {int(d) for d in part.column("embed_dim").to_pylist()}
        if len(dims) != 1:
            raise RuntimeError(f"shard {shard_id}: prompt embeddings of different widths {sorted(dims)}")
        receipts["shard"].append(shard_id)
        receipts["path"].append(rel)
        receipts["rows"].append(part.num_rows)
        receipts["shapes"].append(json.dumps(sorted({tuple(s) for s in shapes})))
        receipts["embed_dim"].append(dims.pop())
        receipts["max_prompt_len"].append(int(pc.max(part.column("prompt_len")).as_py()))
    return {k: np.asarray(v, dtype=object if k in ("shard", "path", "shapes") else np.int64)
            for k, v in receipts.items()}


def read_latent_cache(uri: str, filesystem=None):
    """(ray Dataset of CACHE_SCHEMA rows, manifest) for training: only committed parts are read."""
    import ray

    manifest, fs, root = read_manifest(uri, filesystem)
    paths = [join(root, p) for p in manifest.part_paths()]
    if not paths:
        raise DataSourceError(f"{describe(fs, root)}: the cache has no rows (counts: {manifest.counts})")
    return ray.data.read_parquet(paths, filesystem=fs, schema=CACHE_SCHEMA), manifest


def read_cache_table(uri: str, filesystem=None) -> tuple[pa.Table, LatentCacheManifest]:
    """All rows in this process, without Ray (small caches, evals, tests)."""
    import pyarrow.parquet as pq

    manifest, fs, root = read_manifest(uri, filesystem)
    tables = [pq.read_table(io.BytesIO(read_bytes(fs, join(root, p)))) for p in manifest.part_paths()]
    table = pa.concat_tables(tables) if tables else CACHE_SCHEMA.empty_table()
    return table, manifest


def decode_rows(batch: dict, dtype: str) -> tuple[list, list]:
    """Per-row float32 latents [C, H, W] and prompt embeddings [L, D] from a numpy/pylist batch."""
    latents = [bytes_to_tensor(b, dtype, s) for b, s in zip(batch["latents"], batch["latents_shape"])]
    embeds = []
    for b, n in zip(batch["prompt_embeds"], batch["prompt_len"]):
        flat = bytes_to_tensor(b, dtype, (-1,))
        embeds.append(flat.view(int(n), -1))
    return latents, embeds


def table_to_batch(table: pa.Table) -> dict:
    """A pyarrow table of cache rows as the dict-of-arrays batch ``decode_rows`` takes."""
    return {name: (np.asarray(table.column(name).to_pylist(), dtype=object)
                   if name in ("latents", "prompt_embeds", "latents_shape") else table.column(name).to_numpy())
            for name in table.column_names}
