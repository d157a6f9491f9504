"""What ``--checkpoint`` may point at, and how ``--watch`` finds new checkpoints.

Accepted checkpoints:
  * a diffusers pipeline folder (has ``model_index.json``);
  * a training checkpoint directory holding one exported pipeline folder, at ``pipeline/``,
    ``export/`` or as its only sub-folder with a ``model_index.json``;
  * a raw training checkpoint of jobs/train_qwen.py (DeepSpeed shards + twinflow/shared.pt), or a
    run's final/ folder: ``convert_training_checkpoint`` exports a pipeline folder into
    ``<checkpoint>/export/pipeline`` (twinflow.export; LoRA merged, sampler presets saved) and reuses
    it on later calls. Anything else raises ``NeedsConversion`` with what to do, and ``--watch``
    records and skips it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

EXPORT_DIRS = ("pipeline", "export", "exported")
WATCH_STATE = "eval_watch.json"


class NeedsConversion(ValueError):
    """A folder that is neither a pipeline, nor holds one, nor can be exported into one (a ValueError, so
    jobs/evaluate.py reports it in one line)."""


def convert_training_checkpoint(checkpoint_dir: Path, out_dir: Path) -> Path:
    """Raw training checkpoint -> diffusers pipeline folder under ``out_dir`` (idempotent: an export of the
    same checkpoint there is reused). Returns the pipeline folder."""
    from twinflow.export.exporter import export_pipeline_folder
    from twinflow.export.sources import ExportError

    try:
        return export_pipeline_folder(checkpoint_dir, out_dir)
    except ExportError as exc:
        raise NeedsConversion(f"{exc}; export a pipeline folder into {checkpoint_dir}/pipeline or pass a diffusers "
                              f"folder to --checkpoint") from None


def is_pipeline(path: Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def resolve_pipeline_folder(checkpoint: str | Path) -> Path:
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path}: no such folder")
    if is_pipeline(path):
        return path
    for name in EXPORT_DIRS:
        if is_pipeline(path / name):
            return path / name
    subs = [p for p in path.iterdir() if p.is_dir() and is_pipeline(p)]
    if len(subs) == 1:
        return subs[0]
    if len(subs) > 1:
        raise NeedsConversion(f"--checkpoint {path} holds several pipeline folders ({', '.join(p.name for p in subs)}); "
                         "point at one of them")
    return convert_training_checkpoint(path, path / "export")


def _newest_mtime(path: Path) -> float:
    return max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.rglob("*") if p.is_file()])


def _is_candidate(path: Path) -> bool:
    """A pipeline folder, a folder holding one, or a Ray Train checkpoint dir (checkpoint_*)."""
    return is_pipeline(path) or any(is_pipeline(path / n) for n in EXPORT_DIRS) or path.name.startswith("checkpoint")


def discover(run_dir: Path, settle_s: float = 30.0, now: float | None = None) -> list[Path]:
    """Checkpoint folders under a run storage path (depth <= 2), oldest first, once unchanged for settle_s."""
    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    found: dict[Path, float] = {}
    for depth1 in sorted(p for p in run_dir.iterdir() if p.is_dir()) if run_dir.is_dir() else []:
        for cand in [depth1] + sorted(p for p in depth1.iterdir() if p.is_dir()):
            if cand.name in EXPORT_DIRS or cand.name == "eval" or not _is_candidate(cand):
                continue
            if any(parent in found for parent in cand.parents):
                continue
            mtime = _newest_mtime(cand)
            if now - mtime >= settle_s:
                found[cand] = mtime
    return sorted(found, key=lambda p: (found[p], str(p)))


class WatchState:
    """Which checkpoints of a run were evaluated (or skipped, and why), kept in the run folder."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / WATCH_STATE
        self.entries: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def done(self, ckpt: Path) -> bool:
        return str(ckpt) in self.entries

    def mark(self, ckpt: Path, status: str, detail: str = "") -> None:
        self.entries[str(ckpt)] = {"status": status, "detail": detail[:500], "time": time.time()}
        tmp = self.path.with_suffix(".part")
        tmp.write_text(json.dumps(self.entries, indent=2))
        tmp.replace(self.path)
