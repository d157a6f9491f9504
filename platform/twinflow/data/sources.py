"""Shards of raw image-text data and the (key, image bytes, caption) samples inside them.

Three layouts, local or on S3 (any pyarrow filesystem):
  parquet     one shard per ``*.parquet`` file; columns of image bytes and text (names configurable,
              aliases tried: image/image_bytes/..., text/caption/prompt/...)
  webdataset  one shard per ``*.tar``; members grouped by key (the file name up to its first dot
              in the member's basename: ``0001.jpg`` + ``0001.txt``), caption from ``.txt`` or ``.json``
  folder      images with same-stem caption files beside them (``cat.png`` + ``cat.txt``); a shard is
              a run of ``files_per_shard`` samples of the sorted listing (a caption file without an
              image is a sample that reads as no_image, so it is counted, not lost)

A shard is the unit of parallelism, of bad-data accounting and of precache resume. Its
``fingerprint`` (paths, sizes, mtimes) tells a resumed job whether it changed.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
from dataclasses import asdict, dataclass
from typing import Iterator

import pyarrow.fs as pafs

from twinflow.data.config import IMAGE_COLUMN_ALIASES, LATENT_CACHE, TEXT_COLUMN_ALIASES, DatasetConfig
from twinflow.data.fs import DataSourceError, describe, exists, file_info, join, list_files

MANIFEST_NAME = "manifest.json"


class BadDataError(RuntimeError):
    """A shard cannot be used: unreadable, or more bad samples than ``data.bad_share_limit``."""


@dataclass(frozen=True)
class Shard:
    id: str                      # filesystem-safe, unique within the source
    format: str                  # parquet | webdataset | folder
    uri: str                     # for messages: the file, or the folder + first image
    paths: tuple[str, ...]       # parquet/tar: one file; folder: the image files
    captions: tuple[str, ...] = ()  # folder: caption file per image ("" when none)
    size: int = 0
    mtime_ns: int = 0

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps([self.format, self.paths, self.captions, self.size, self.mtime_ns]).encode())
        return h.hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "Shard":
        d = json.loads(text)
        d["paths"], d["captions"] = tuple(d["paths"]), tuple(d["captions"])
        return Shard(**d)


# ----------------------------------------------------------------------------- listing


def detect_format(cfg: DatasetConfig, fs: pafs.FileSystem, root: str) -> str:
    if cfg.format != "auto":
        return cfg.format
    info = file_info(fs, root)
    if info.type == pafs.FileType.File:
        files = [info]
    else:
        if exists(fs, join(root, MANIFEST_NAME)):
            return LATENT_CACHE
        files = list_files(fs, root)
    exts = {_ext(i.path) for i in files}
    if "parquet" in exts:
        return "parquet"
    if "tar" in exts:
        return "webdataset"
    if exts & {e.lower() for e in cfg.image_extensions}:
        return "folder"
    raise DataSourceError(f"{describe(fs, root)}: no *.parquet, *.tar or image files found "
                          f"(set data.format explicitly if the files have other extensions)")


def list_shards(cfg: DatasetConfig, fs: pafs.FileSystem, root: str) -> list[Shard]:
    """All shards of the source, in a stable order."""
    fmt = detect_format(cfg, fs, root)
    if fmt == LATENT_CACHE:
        raise DataSourceError(f"{describe(fs, root)} is a latent cache; read it with twinflow.data.read_latent_cache")
    files = list_files(fs, root)
    base = root if file_info(fs, root).type == pafs.FileType.Directory else posixpath.dirname(root)
    if fmt in ("parquet", "webdataset"):
        want = "parquet" if fmt == "parquet" else "tar"
        shards = [Shard(id=_shard_id(posixpath.relpath(i.path, base)), format=fmt, uri=describe(fs, i.path),
                        paths=(i.path,), size=i.size or 0, mtime_ns=i.mtime_ns or 0)
                  for i in files if _ext(i.path) == want]
    elif fmt == "folder":
        shards = _folder_shards(cfg, fs, base, files)
    else:
        raise DataSourceError(f"unknown data.format {fmt!r}")
    if not shards:
        raise DataSourceError(f"{describe(fs, root)}: no {fmt} shards found")
    return shards


def _folder_shards(cfg: DatasetConfig, fs, base: str, files: list[pafs.FileInfo]) -> list[Shard]:
    image_exts = {e.lower() for e in cfg.image_extensions}
    caption_exts = [e.lower() for e in cfg.caption_extensions]
    by_stem: dict[str, dict[str, pafs.FileInfo]] = {}
    for i in files:
        stem, ext = posixpath.splitext(i.path)
        by_stem.setdefault(stem, {})[ext[1:].lower()] = i
    images = []
    for stem, group in sorted(by_stem.items()):
        caption = next((group[c] for c in caption_exts if c in group), None)
        image = next((info for ext, info in group.items() if ext in image_exts), None)
        if image is not None or caption is not None:
            # A caption without an image is a sample too: read as no_image and counted, never dropped.
            images.append((image, caption))
    shards = []
    n = cfg.files_per_shard
    for start in range(0, len(images), n):
        chunk = images[start:start + n]
        sizes = sum(((i.size or 0) if i else 0) + ((c.size or 0) if c else 0) for i, c in chunk)
        mtime = max(max((i.mtime_ns or 0) if i else 0, (c.mtime_ns or 0) if c else 0) for i, c in chunk)
        first = chunk[0][0] or chunk[0][1]
        shards.append(Shard(id=f"folder-{start // n:06d}", format="folder",
                            uri=f"{describe(fs, base)} [{posixpath.relpath(first.path, base)} ...]",
                            paths=tuple(i.path if i else "" for i, _ in chunk),
                            captions=tuple(c.path if c else "" for _, c in chunk),
                            size=sizes, mtime_ns=mtime))
    return shards


def _ext(path: str) -> str:
    return posixpath.splitext(path)[1][1:].lower()


def _shard_id(relpath: str) -> str:
    stem = relpath.rsplit(".", 1)[0] if "." in posixpath.basename(relpath) else relpath
    return re.sub(r"[^A-Za-z0-9._-]+", "__", stem.replace("/", "__"))


# ----------------------------------------------------------------------------- samples


def iter_samples(shard: Shard, cfg: DatasetConfig, fs: pafs.FileSystem) -> Iterator[tuple[str, bytes | None, object]]:
    """(key, image bytes or None, caption or None) for every sample in the shard.

    Per-sample problems are returned as None fields (counted later); a shard that cannot be opened
    or is truncated raises BadDataError naming it.
    """
    try:
        if shard.format == "parquet":
            yield from _parquet_samples(shard, cfg, fs)
        elif shard.format == "webdataset":
            yield from _tar_samples(shard, cfg, fs)
        elif shard.format == "folder":
            yield from _folder_samples(shard, cfg, fs)
        else:
            raise BadDataError(f"shard {shard.uri}: unknown format {shard.format!r}")
    except BadDataError:
        raise
    except (OSError, tarfile.TarError, ValueError, EOFError) as exc:
        raise BadDataError(f"shard {shard.uri}: cannot be read ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc


def _pick_column(names: list[str], configured: str, aliases: tuple[str, ...], what: str, shard: Shard) -> str:
    for name in (configured, *aliases):
        if name in names:
            return name
    raise BadDataError(f"shard {shard.uri}: no {what} column {configured!r} (nor {', '.join(aliases)}); "
                       f"columns are {names}; set data.{what}_column")


def _parquet_samples(shard: Shard, cfg: DatasetConfig, fs) -> Iterator[tuple[str, bytes | None, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open_input_file(shard.paths[0]) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        image_col = _pick_column(names, cfg.image_column, IMAGE_COLUMN_ALIASES, "image", shard)
        text_col = _pick_column(names, cfg.text_column, TEXT_COLUMN_ALIASES, "text", shard)
        row = 0
        for batch in pf.iter_batches(batch_size=256, columns=[image_col, text_col]):
            images = batch.column(0)
            if pa.types.is_struct(images.type):
                images = images.field("bytes")  # HF datasets' Image feature: struct{bytes, path}
            for img, text in zip(images.to_pylist(), batch.column(1).to_pylist()):
                yield f"{shard.id}/{row}", img, text
                row += 1


def _tar_samples(shard: Shard, cfg: DatasetConfig, fs) -> Iterator[tuple[str, bytes | None, object]]:
    image_exts = {e.lower() for e in cfg.image_extensions}
    caption_exts = [e.lower() for e in cfg.caption_extensions]
    with fs.open_input_stream(shard.paths[0]) as raw:
        # "r|*": a forward-only stream (no seeking on S3), any compression
        with tarfile.open(fileobj=raw, mode="r|*") as tar:
            key, group = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                dirname, base = posixpath.split(member.name)
                if base.startswith((".", "_")):
                    continue
                stem, _, ext = base.partition(".")
                mkey = posixpath.join(dirname, stem)
                if mkey != key:
                    if key is not None:
                        yield _tar_group(shard, key, group, image_exts, caption_exts, cfg)
                    key, group = mkey, {}
                group[ext.lower()] = tar.extractfile(member).read()
            if key is not None:
                yield _tar_group(shard, key, group, image_exts, caption_exts, cfg)


def _tar_group(shard, key, group, image_exts, caption_exts, cfg):
    image = next((group[e] for e in group if e in image_exts), None)
    caption = None
    for ext in caption_exts:
        if ext in group:
            caption = _caption_from(ext, group[ext], cfg)
            break
    return f"{shard.id}/{key}", image, caption


def _caption_from(ext: str, data: bytes, cfg: DatasetConfig):
    if ext != "json":
        return data
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(obj, dict):
        for name in (cfg.caption_json_field, *TEXT_COLUMN_ALIASES):
            if isinstance(obj.get(name), str):
                return obj[name]
    return None


def _folder_samples(shard: Shard, cfg: DatasetConfig, fs) -> Iterator[tuple[str, bytes | None, object]]:
    for image_path, caption_path in zip(shard.paths, shard.captions):
        key = f"{shard.id}/{posixpath.basename(image_path or caption_path)}"
        image = None  # an orphan caption: counted as no_image
        if image_path:
            with fs.open_input_stream(image_path) as f:
                image = f.read()
        caption = None
        if caption_path:
            with fs.open_input_stream(caption_path) as f:
                caption = _caption_from(_ext(caption_path), f.read(), cfg)
        yield key, image, caption

