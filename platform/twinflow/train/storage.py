"""Where a run lives: ``<run.storage_path>/<run.name>``, on local disk or S3 (any pyarrow filesystem).

Ray Train writes its checkpoints there (``RunConfig(storage_path, storage_filesystem)``, with the
path WITHOUT ``s3://`` when a filesystem is given); the job adds ``config.yaml`` (the resolved
config, checked on re-submission), ``tensorboard/``, ``samples/`` and ``final/``. The handle is
built once on the driver from the data layer's ``filesystem_for`` (S3 settings from AWS_*
variables) and pickled to the workers with its credentials, so workers need no environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow.fs as pafs

from twinflow.data.fs import describe, exists, filesystem_for, join, read_bytes, write_bytes_atomic


@dataclass
class RunStorage:
    fs: pafs.FileSystem
    root: str
    """storage_path as a path of ``fs`` (no scheme)."""
    name: str

    @staticmethod
    def for_run(storage_path: str, name: str, filesystem: pafs.FileSystem | None = None) -> "RunStorage":
        fs, root = filesystem_for(storage_path, filesystem)
        return RunStorage(fs=fs, root=root, name=name)

    @property
    def remote(self) -> bool:
        return not isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def run_path(self) -> str:
        return join(self.root, self.name)

    def path(self, *parts: str) -> str:
        return join(self.run_path, *parts)

    def uri(self, *parts: str) -> str:
        """What a user types to find it: s3://bucket/... or a local path."""
        return describe(self.fs, self.path(*parts))

    def local_path(self, *parts: str) -> str:
        if self.remote:
            raise ValueError("the run lives in remote storage; there is no local path")
        return self.path(*parts)

    def exists(self, *parts: str) -> bool:
        return exists(self.fs, self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        return read_bytes(self.fs, self.path(*parts))

    def write_bytes(self, data: bytes, *parts: str) -> None:
        write_bytes_atomic(self.fs, self.path(*parts), data)

    def upload_dir(self, local_dir: str, *parts: str) -> str:
        """Copy a local folder's files to ``<run>/<parts>`` (overwriting); returns its URI."""
        dest = self.path(*parts)
        if not self.remote and os.path.abspath(local_dir) == os.path.abspath(dest):
            return self.uri(*parts)
        self.fs.create_dir(dest, recursive=True)
        pafs.copy_files(local_dir, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        return self.uri(*parts)

    def ray_run_config_kwargs(self) -> dict:
        """``storage_path`` / ``storage_filesystem`` for ray.train.RunConfig."""
        if self.remote:
            return {"storage_path": self.root, "storage_filesystem": self.fs}
        return {"storage_path": self.root}
