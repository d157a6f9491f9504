"""Prompt sets of the three benchmarks, read at run time from a benchmarks folder (never copied).

The folder holds the official files in their published layout (see shared/benchmarks/*/LICENSE-NOTE.md):
  geneval/prompts/evaluation_metadata.jsonl, geneval/prompts/object_names.txt
  dpg_bench/prompts/<item_id>.txt            (the question CSV is separate: ``load_dpg_questions``)
  wise/WISE_legacy/data/*.json, wise/data_verified/merge.json
Every loader returns ``Item``s in a fixed order, so ``--limit N`` always means the same N prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evals.wise.rules import RANGES, category_of

BENCHMARKS = ("geneval", "dpg", "wise", "digits")
FILE_BENCHMARKS = ("geneval", "dpg", "wise")
"""The ones whose prompts come from a benchmarks folder (digits builds its own, evals/digits)."""
ENV_DATA_ROOT = "TWINFLOW_BENCHMARKS_DIR"
DPG_CSV_URL = "https://raw.githubusercontent.com/TencentQQGYLab/ELLA/main/dpg_bench/dpg_bench.csv"
DPG_CSV_GIT_BLOB = "98457fc9901943f51ff9a30367250fc292533bed"
WISE_LEGACY_FILES = ("cultural_common_sense", "spatio-temporal_reasoning", "natural_science")
_WISE_JSON_CATEGORY = {"cultural knowledge": "CULTURE", "time": "TIME", "space": "SPACE", "biology": "BIOLOGY",
                       "physical knowledge": "PHYSICS", "chemistry": "CHEMISTRY"}


class DataError(FileNotFoundError):
    """A benchmark file is missing or malformed; the message says which and how to get it."""


@dataclass
class Item:
    """One prompt of a benchmark: ``key`` names its images/records, ``meta`` carries scoring data."""

    key: str
    prompt: str
    meta: dict[str, Any] = field(default_factory=dict)


REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOTS = ("shared/benchmarks", "../shared/benchmarks")
"""Tried (from the working directory, then from the repository root) when data_root and
$TWINFLOW_BENCHMARKS_DIR are unset: a checkout with the shared data beside or inside it."""


def resolve_data_root(configured: str) -> Path:
    """The benchmarks folder: data_root, else $TWINFLOW_BENCHMARKS_DIR, else the first of
    DEFAULT_DATA_ROOTS that exists; a relative path is looked up from the working directory, then
    from the repository root, so the same command works from any folder."""
    given = configured or os.environ.get(ENV_DATA_ROOT, "")
    names = [given] if given else list(DEFAULT_DATA_ROOTS)
    tried = []
    for name in names:
        p = Path(name).expanduser()
        for cand in [p] if p.is_absolute() else [p, REPO_ROOT / p]:
            if cand.is_dir():
                return cand.resolve()
            tried.append(str(cand))
    raise DataError(f"benchmarks folder not found (tried {', '.join(dict.fromkeys(tried))}); set data_root "
                    f"(or ${ENV_DATA_ROOT}) to the folder holding geneval/, dpg_bench/ and wise/")


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} not found at {path}")
    return path


def _limit(items: list[Item], limit: int) -> list[Item]:
    return items[:limit] if limit and limit > 0 else items


def load_geneval(root: Path, limit: int = 0) -> list[Item]:
    """553 prompts; key = 5-digit line index (the official folder name)."""
    path = _need(root / "geneval" / "prompts" / "evaluation_metadata.jsonl", "GenEval evaluation_metadata.jsonl")
    items = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        meta = json.loads(line)
        items.append(Item(key=f"{i:05d}", prompt=meta["prompt"], meta=meta))
    return _limit(items, limit)


def geneval_object_names(root: Path) -> list[str]:
    path = _need(root / "geneval" / "prompts" / "object_names.txt", "GenEval object_names.txt")
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if len(names) != 80:
        raise DataError(f"{path}: expected 80 COCO class names, found {len(names)}")
    return names


def load_dpg(root: Path, limit: int = 0) -> list[Item]:
    """1,065 prompts; key = item_id (the file stem), sorted by name for a stable order."""
    folder = root / "dpg_bench" / "prompts"
    if not folder.is_dir():
        raise DataError(f"DPG-Bench prompt folder not found at {folder}")
    items = [Item(key=p.stem, prompt=p.read_text().strip()) for p in sorted(folder.glob("*.txt"))]
    return _limit(items, limit)


def load_wise(root: Path, protocol: str = "legacy", rewrite: bool = False, limit: int = 0) -> list[Item]:
    """1,000 prompts (1 image each); key = str(prompt_id). Checks the JSON against the protocol's ranges."""
    if protocol == "legacy":
        suffix = "_rewrite" if rewrite else ""
        files = [root / "wise" / "WISE_legacy" / "data" / f"{name}{suffix}.json" for name in WISE_LEGACY_FILES]
    elif protocol == "verified":
        if rewrite:
            raise DataError("WISE_Verified has no rewrite prompt set; use wise.rewrite=false")
        files = [root / "wise" / "data_verified" / "merge.json"]
    else:
        raise DataError(f"unknown WISE protocol {protocol!r}")
    rows: list[dict] = []
    for f in files:
        rows.extend(json.loads(_need(f, f"WISE {protocol} prompts").read_text()))
    items, mismatched = [], 0
    for r in sorted(rows, key=lambda r: int(r["prompt_id"])):
        pid = int(r["prompt_id"])
        cat = category_of(pid, protocol)
        json_cat = _WISE_JSON_CATEGORY.get(str(r.get("Category", "")).strip().lower())
        mismatched += json_cat is not None and json_cat != cat
        items.append(Item(key=str(pid), prompt=r["Prompt"], meta={
            "prompt_id": pid, "category": cat, "subcategory": r.get("Subcategory", ""),
            "explanation": r.get("Explanation", "")}))
    # Legacy and Verified ranges differ; a JSON scored against the wrong ranges mislabels silently.
    if mismatched > 0.05 * max(1, len(items)):
        raise DataError(f"{mismatched} WISE prompts fall outside their category's {protocol} id range "
                        f"{RANGES[protocol]}; the JSON belongs to the other protocol")
    return _limit(items, limit)


def load_digits(templates: int = 2, limit: int = 0) -> list[Item]:
    """Every class × caption template (evals/digits/rules.py); key "<class>-<template>"."""
    from evals.digits.rules import digit_prompts

    return _limit([Item(key=k, prompt=p, meta=m) for k, p, m in digit_prompts(templates)], limit)


def git_blob_sha1(data: bytes) -> str:
    """What ``git hash-object`` prints for these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def load_dpg_questions(source: str, cache_dir: Path | None = None, expect_blob: str = DPG_CSV_GIT_BLOB) -> str:
    """The DPG question CSV text from a local path or an http(s) URL (downloaded once into cache_dir).

    ``expect_blob`` (the official file's git blob hash) is checked when non-empty, so a truncated or
    edited CSV cannot silently change the benchmark; pass "" for a custom CSV.
    """
    if not source:
        raise DataError("dpg.questions_csv is empty: point it at dpg_bench.csv (path or URL), e.g. " + DPG_CSV_URL)
    if source.startswith(("http://", "https://")):
        cached = (cache_dir / "dpg_bench.csv") if cache_dir else None
        if cached is not None and cached.is_file():
            data = cached.read_bytes()
        else:
            try:
                with urllib.request.urlopen(source, timeout=60) as resp:  # noqa: S310 - user-given URL
                    data = resp.read()
            except OSError as exc:
                raise DataError(f"could not download the DPG question CSV from {source}: {exc}") from exc
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_bytes(data)
    else:
        data = _need(Path(source).expanduser(), "DPG question CSV").read_bytes()
    if expect_blob and git_blob_sha1(data) != expect_blob:
        raise DataError(f"DPG question CSV {source} has git blob {git_blob_sha1(data)}, expected {expect_blob} "
                        "(the official file); set dpg.questions_blob='' to accept a custom CSV")
    return data.decode("utf-8-sig")
