"""Per-item records on disk: append-only JSON lines, the newest line per (nfe, key) wins.

The driver appends every shard's records the moment the shard finishes (flushed and fsynced), so
an interrupted evaluation loses at most the shards in flight and a rerun skips what is recorded.
A corrupt trailing line (the process died mid-write) is ignored and counted, never fatal.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable


class RecordStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.corrupt_lines = 0

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        records = list(records)
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        self.corrupt_lines = 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                self.corrupt_lines += 1
        return out

    def latest(self) -> dict[tuple[int, str], dict[str, Any]]:
        """(nfe, key) -> the last record written for it."""
        return {(int(r["nfe"]), str(r["key"])): r for r in self.read()}

    def reset(self) -> None:
        if self.path.exists():
            self.path.unlink()
