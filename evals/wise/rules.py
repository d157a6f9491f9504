"""WISE's scoring rules as pure functions (BENCHMARKS.md §3.2-3.3).

Two protocols that must never be mixed (different prompt JSONs, id ranges, weights and judges):
  ``legacy``   (the paper; the Qwen-Image 0.62 cited by TwinFlow): the judge grades Consistency,
               Realism and Aesthetic Quality 0-2; WiScore = (0.7 C + 0.2 R + 0.1 A) / 2.
  ``verified`` (WISE_Verified, the repo default since 2026-04): binary "Score: 0|1".
Category score = plain mean over the scored ids of its range; overall = prompt-share weighted sum.
A reply that cannot be parsed is retried, and after the last attempt the image is *skipped*, never
scored 0; the official full-set overall is refused while any id is missing, and so is ours
(``overall`` is None; ``overall_over_scored`` is reported beside it, labelled).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

PROTOCOLS = ("legacy", "verified")
CATEGORIES = ("CULTURE", "TIME", "SPACE", "BIOLOGY", "PHYSICS", "CHEMISTRY")

# Inclusive prompt_id ranges per category.
RANGES = {
    "legacy": {"CULTURE": (1, 400), "TIME": (401, 567), "SPACE": (568, 700),
               "BIOLOGY": (701, 800), "PHYSICS": (801, 900), "CHEMISTRY": (901, 1000)},
    "verified": {"CULTURE": (1, 400), "TIME": (401, 520), "SPACE": (521, 640),
                 "BIOLOGY": (641, 760), "PHYSICS": (761, 880), "CHEMISTRY": (881, 1000)},
}
WEIGHTS = {
    "legacy": {"CULTURE": 0.4, "TIME": 0.167, "SPACE": 0.133, "BIOLOGY": 0.1, "PHYSICS": 0.1, "CHEMISTRY": 0.1},
    "verified": {"CULTURE": 0.40, "TIME": 0.12, "SPACE": 0.12, "BIOLOGY": 0.12, "PHYSICS": 0.12, "CHEMISTRY": 0.12},
}
WISCORE_WEIGHTS = {"consistency": 0.7, "realism": 0.2, "aesthetic_quality": 0.1}
_LEGACY_KEYS = {"consistency": "consistency", "realism": "realism", "aesthetic quality": "aesthetic_quality"}
_LEGACY_RE = re.compile(r"(consistency|realism|aesthetic\s+quality)\s*:?\s*\**\s*(\d)", re.IGNORECASE)
_VERIFIED_RE = re.compile(r"score\s*:\s*\**\s*([01])\b", re.IGNORECASE)
_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


def category_of(prompt_id: int, protocol: str) -> str:
    for name, (lo, hi) in RANGES[protocol].items():
        if lo <= int(prompt_id) <= hi:
            return name
    raise ValueError(f"prompt_id {prompt_id} is outside the {protocol} ranges 1-1000")


def strip_thinking(text: str) -> str:
    """Drop <think>...</think> blocks (and an unterminated trailing one) from a reply."""
    text = _THINK_RE.sub("", text or "")
    if "<think>" in text.lower():
        text = text[: text.lower().index("<think>")]
    return text.strip()


def parse_legacy(text: str) -> dict[str, int] | None:
    """Three 0-2 grades from a reply, or None (-> retry, then skip).

    Primary: "Consistency: x", "Realism: y", "Aesthetic Quality: z" anywhere, case-insensitive,
    colon optional. Fallback: three bare lines holding one grade each, in that order. All three keys
    are required. A grade outside 0-2 makes the reply unparseable (the rubric has no such grade).
    """
    text = strip_thinking(text)
    found: dict[str, int] = {}
    for key, digit in _LEGACY_RE.findall(text):
        name = _LEGACY_KEYS[re.sub(r"\s+", " ", key.lower())]
        found.setdefault(name, int(digit))
    if len(found) < 3:
        bare = [ln.strip().strip("*").strip() for ln in text.splitlines() if ln.strip()]
        bare = [ln for ln in bare if re.fullmatch(r"\d", ln)]
        if len(bare) == 3:
            found = dict(zip(("consistency", "realism", "aesthetic_quality"), map(int, bare)))
    if len(found) < 3 or any(not 0 <= v <= 2 for v in found.values()):
        return None
    return found


def parse_verified(text: str) -> int | None:
    """0 or 1 from "Score: 0|1", or from a reply that is a single bare 0/1 line; else None."""
    text = strip_thinking(text)
    m = _VERIFIED_RE.search(text)
    if m:
        return int(m.group(1))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) == 1 and lines[0] in ("0", "1"):
        return int(lines[0])
    return None


def wiscore(grades: Mapping[str, int]) -> float:
    """(0.7 consistency + 0.2 realism + 0.1 aesthetic) / 2, in [0, 1]."""
    return sum(WISCORE_WEIGHTS[k] * float(grades[k]) for k in WISCORE_WEIGHTS) / 2.0


def aggregate(scores: Mapping[int, float], protocol: str, expected_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """Category means and the weighted overall from per-id scores (skipped ids are simply absent).

    ``expected_ids`` defaults to 1..1000. ``overall`` is None unless every expected id is scored
    and every category is present; ``overall_over_scored`` renormalises the weights over the
    categories that have scores, for partial runs (``--limit``), and is labelled as such.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"WISE protocol must be one of {PROTOCOLS}, got {protocol!r}")
    expected = list(expected_ids) if expected_ids is not None else list(range(1, 1001))
    by_cat: dict[str, list[float]] = {}
    for pid, s in scores.items():
        by_cat.setdefault(category_of(pid, protocol), []).append(float(s))
    cats = {c: sum(by_cat[c]) / len(by_cat[c]) for c in CATEGORIES if c in by_cat}
    weights = WEIGHTS[protocol]
    missing_ids = sorted(set(expected) - set(int(k) for k in scores))
    complete = not missing_ids and len(cats) == len(CATEGORIES)
    covered = sum(weights[c] for c in cats)
    return {
        "protocol": protocol,
        "overall": sum(weights[c] * v for c, v in cats.items()) if complete else None,
        "overall_over_scored": (sum(weights[c] * v for c, v in cats.items()) / covered) if cats else None,
        "categories": cats,
        "images_per_category": {c: len(by_cat[c]) for c in cats},
        "missing_ids": missing_ids,
        "complete": complete,
    }
