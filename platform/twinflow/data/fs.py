"""One way to turn a data/checkpoint URI into a pyarrow filesystem, for every job.

``filesystem_for("s3://bucket/prefix") -> (pyarrow.fs.S3FileSystem, "bucket/prefix")`` and
``filesystem_for("/local/dir") -> (LocalFileSystem, "/local/dir")``. The same pair feeds
Ray Data (``read_parquet(path, filesystem=fs)``), our shard readers, and Ray Train
(``RunConfig(storage_path=path, storage_filesystem=fs)`` — path WITHOUT ``s3://`` there).

S3 settings come from the standard AWS environment variables:
  AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL   custom endpoint (SeaweedFS, MinIO, R2, ...)
  AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN
  AWS_REGION / AWS_DEFAULT_REGION
What the libraries honour by themselves (measured with pyarrow 26, s3fs 2026.9 / botocore 1.43):
  * s3fs (botocore) reads all of them, the endpoint included;
  * ``pyarrow.fs.FileSystem.from_uri("s3://...")`` reads them, the endpoint included;
  * ``pyarrow.fs.S3FileSystem()`` built directly reads the keys but IGNORES AWS_ENDPOINT_URL and
    then talks to <bucket>.s3.<region>.amazonaws.com.
So we always build the S3FileSystem explicitly from the environment (bridging the endpoint and
its http/https scheme) instead of relying on which constructor a caller happened to use.

The returned filesystem pickles with its options (credentials included), so build it once on the
driver and ship it to Ray tasks: workers started before the environment was set still see S3.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_SCHEMES = ("s3", "s3a")


class DataSourceError(RuntimeError):
    """The data source cannot be reached or read (missing path, bad credentials, no endpoint)."""


def s3_filesystem_from_env(env: dict | None = None, allow_bucket_creation: bool = False) -> pafs.S3FileSystem:
    """An S3FileSystem configured from the AWS_* variables of ``env`` (default: os.environ)."""
    env = os.environ if env is None else env
    kwargs: dict = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "https"
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret)
        if env.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = env["AWS_SESSION_TOKEN"]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    elif endpoint:
        kwargs["region"] = "us-east-1"  # S3-compatible servers accept any region; avoid AWS lookups
    return pafs.S3FileSystem(allow_bucket_creation=allow_bucket_creation, **kwargs)


def filesystem_for(uri: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path, ``file://``, ``s3://`` or any pyarrow-known URI.

    With ``filesystem`` given, only the path part is derived (``s3://b/k`` -> ``b/k``).
    """
    uri = str(uri)
    parsed = urlparse(uri) if "://" in uri else None
    if parsed is not None and parsed.scheme in S3_SCHEMES:
        path = (parsed.netloc + parsed.path).rstrip("/")
        if not parsed.netloc:
            raise DataSourceError(f"{uri}: an S3 URI needs a bucket, e.g. s3://my-bucket/prefix")
        return (filesystem or s3_filesystem_from_env()), path
    if parsed is None or parsed.scheme == "file":
        local = parsed.path if parsed is not None else uri
        return (filesystem or pafs.LocalFileSystem()), os.path.abspath(os.path.expanduser(local))
    if filesystem is not None:
        return filesystem, (parsed.netloc + parsed.path).rstrip("/")
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataSourceError(f"{uri}: no filesystem for this URI ({exc})") from exc


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts) if path else posixpath.join(*parts)


def describe(fs: pafs.FileSystem, path: str) -> str:
    """The URI a user would type for ``path`` on ``fs`` (for messages and manifests)."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def file_info(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as exc:  # unreachable endpoint, bad credentials, ...
        raise DataSourceError(f"{describe(fs, path)}: cannot reach the storage ({str(exc).splitlines()[0]})") from exc


def list_files(fs: pafs.FileSystem, path: str, recursive: bool = True) -> list[pafs.FileInfo]:
    """Files under ``path`` (sorted by path); hidden and temporary entries (``.x``, ``_x``) skipped."""
    info = file_info(fs, path)
    if info.type == pafs.FileType.File:
        return [info]
    if info.type == pafs.FileType.NotFound:
        raise DataSourceError(f"{describe(fs, path)}: not found")
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    except OSError as exc:
        raise DataSourceError(f"{describe(fs, path)}: cannot list ({str(exc).splitlines()[0]})") from exc
    out = []
    for i in infos:
        if i.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(i.path, path)
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        out.append(i)
    return sorted(out, key=lambda i: i.path)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return file_info(fs, path).type != pafs.FileType.NotFound


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see the whole object or nothing.

    An S3 PUT is atomic by itself. On other filesystems write a temporary sibling and rename,
    so a crash mid-write never leaves a truncated file under the final name.
    """
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.S3FileSystem):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def delete_dir_if_exists(fs: pafs.FileSystem, path: str) -> None:
    if file_info(fs, path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
