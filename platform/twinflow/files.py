"""Reading files a job did not write itself: safely, completely, and with one-line errors.

Every job reads folders a user points at (a model, a checkpoint, a run's final/), and a truncated
download or a crafted file must end the job with one line that names the file (exit code 2),
before any Ray work starts, never as a traceback deep inside a worker and never by running code.

  FileProblem             the one error type: "<path>: <what is wrong>; <what to do>"
  check_safetensors(p)    header + coverage check (safetensors refuses a file its header does not
                          cover, so a truncated file is caught without reading the tensors)
  check_json(p)           parses
  check_tree(folder)      every *.safetensors / *.json under a folder (a diffusers pipeline, a
                          run's final/, a training checkpoint's own files)
  check_model_folder(p)   check_tree for a local model folder; hub ids pass
  weights_only_loads()    inside the block every ``torch.load`` is weights-only, also DeepSpeed's
                          (its checkpoint engine passes weights_only=False): a pickle that needs a
                          global outside torch's allow-list plus the few DeepSpeed record types
                          its checkpoints hold is refused instead of executed
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

CHECKED_SUFFIXES = (".safetensors", ".json")


class FileProblem(ValueError):
    """A file that cannot be used as it is (unreadable, truncated, not what it claims, unsafe)."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, short enough for a terminal line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


def check_safetensors(path: str | Path) -> list[str]:
    """The tensor names of a complete safetensors file, or FileProblem naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: the same problem for the user
        raise FileProblem(f"{path}: unreadable safetensors file ({one_line(exc)}); it is truncated or not a "
                          f"safetensors file: copy or download it again") from None


def check_json(path: str | Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileProblem(f"{path}: unreadable JSON ({one_line(exc)}); it is truncated or corrupt: copy it "
                          f"again") from None


def _files(folder: Path, skip_dirs: Iterable[str]) -> Iterator[Path]:
    skip = set(skip_dirs)
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(CHECKED_SUFFIXES):
                yield Path(root) / name


def check_tree(folder: str | Path, skip_dirs: Iterable[str] = ("eval",)) -> int:
    """Check every safetensors and JSON file under ``folder``; returns how many were checked."""
    n = 0
    for path in _files(Path(folder), skip_dirs):
        if path.suffix == ".safetensors":
            check_safetensors(path)
        else:
            check_json(path)
        n += 1
    return n


def check_model_folder(path_or_hub_id: str | Path) -> None:
    """A local model folder: every weight and config file complete (FileProblem naming the first bad
    one); hub ids are left to diffusers' downloader."""
    folder = Path(path_or_hub_id).expanduser()
    if folder.is_dir():
        check_tree(folder)


# ---------------------------------------------------------------------------
# pickles written by DeepSpeed
# ---------------------------------------------------------------------------


def deepspeed_safe_globals() -> list:
    """DeepSpeed types pickled into its ZeRO checkpoint files (found by loading ZeRO-2/3 checkpoints with
    weights_only=True): an enum, the loss-scaler state records and a (numel, start) dataclass. Nothing
    here runs code on unpickling (no __reduce__ / __setstate__ of their own)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """Every ``torch.load`` inside the block is weights-only, even one that passes weights_only=False.

    torch's own switch ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` makes its restricted unpickler run whatever
    the caller asked for; the allow-list is torch's plus ``deepspeed_safe_globals()``.
    """
    import torch

    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v


def refused_pickle(exc: BaseException) -> str | None:
    """When torch's weights-only unpickler refused a file (a crafted or foreign pickle): what it refused,
    e.g. "GLOBAL posix.mkdir"; else None."""
    import pickle
    import re

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
            found = re.search(r"unsupported (GLOBAL [\w.]+)|Unsupported global: (GLOBAL [\w.]+)", text)
            return (found.group(1) or found.group(2)) if found else "a non-tensor object"
        exc = exc.__cause__ or exc.__context__
    return None


def is_refused_pickle(exc: BaseException) -> bool:
    return refused_pickle(exc) is not None
