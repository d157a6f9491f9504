"""DPG-Bench's scoring rules as pure functions (BENCHMARKS.md §2.3-2.4).

The VQA model only produces answer strings; everything here turns answers into numbers:
  * question graph per prompt from the CSV rows (``dependency`` lists parent proposition ids, 0 = none);
  * per tile: raw score 1 iff the answer is exactly ``"yes"``; then, in CSV order and in place, a
    question whose non-zero parent currently scores 0 is zeroed (zeros propagate down chains whose
    parents come first); tile score = mean over the prompt's questions;
  * prompt score = mean over its tiles; benchmark = mean over prompts x 100;
  * category breakdown = micro-average of raw (pre-dependency) answers per category x 100.

Two modes:
  ``official`` reproduces ELLA's compute_dpg_bench.py at 3c228f1 including its quirks: the first CSV
    data row is skipped (issue #61), so a prompt whose question depends on that proposition raises
    KeyError there and is dropped from the mean (here: status ``dropped_official_quirk``, counted);
    categories use the raw answers of the last tile only (issue #60).
  ``fixed`` keeps the first row and averages the raw answers of all tiles for the categories.
Both modes are computed from the same recorded answers, so a report can carry both.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

MODES = ("official", "fixed")
L1_CATEGORIES = ("global", "entity", "attribute", "relation", "other")
CSV_COLUMNS = ("item_id", "text", "keywords", "proposition_id", "dependency", "category_broad",
               "category_detailed", "tuple", "question_natural_language")


@dataclass
class Question:
    qid: int
    text: str
    tuple: str
    parents: list[int]

    @property
    def category(self) -> str:
        """Level-2 category: the tuple text before '(' (e.g. 'attribute - color')."""
        return self.tuple.split("(")[0].strip()

    @property
    def category_l1(self) -> str:
        return self.category.split("-")[0].strip()


@dataclass
class PromptQuestions:
    item_id: str
    questions: dict[int, Question] = field(default_factory=dict)  # CSV order


def read_rows(text: str) -> list[dict[str, str]]:
    """CSV text -> rows; checks the columns the scorer needs."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in ("item_id", "proposition_id", "dependency", "tuple", "question_natural_language")
               if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"DPG question CSV lacks columns {missing}; expected {', '.join(CSV_COLUMNS)}")
    return list(reader)


def parse_dependency(text: str) -> list[int]:
    return [int(float(d.strip())) for d in str(text).split(",") if d.strip()]


def build_questions(rows: Sequence[Mapping[str, Any]], mode: str = "official") -> dict[str, PromptQuestions]:
    """Group CSV rows into per-prompt question graphs; ``official`` skips the first data row."""
    if mode not in MODES:
        raise ValueError(f"DPG mode must be one of {MODES}, got {mode!r}")
    out: dict[str, PromptQuestions] = {}
    for i, row in enumerate(rows):
        if mode == "official" and i == 0:
            continue  # the published loop skips row index 0 (ELLA issue #61)
        item = str(row["item_id"]).strip()
        q = Question(qid=int(float(row["proposition_id"])), text=str(row["question_natural_language"]),
                     tuple=str(row["tuple"]), parents=parse_dependency(row["dependency"]))
        out.setdefault(item, PromptQuestions(item)).questions[q.qid] = q
    return out


class DependencyError(KeyError):
    """A question depends on a proposition the graph does not have (official mode's dropped prompt)."""


def raw_scores(answers: Mapping[int, str]) -> dict[int, float]:
    """1.0 iff the answer string is exactly 'yes' (the official rule; 'Yes' or 'yes.' score 0)."""
    return {qid: float(a == "yes") for qid, a in answers.items()}


def apply_dependencies(pq: PromptQuestions, scores: Mapping[int, float]) -> dict[int, float]:
    """Zero a question whose non-zero parent currently scores 0, in CSV order, in place on a copy."""
    out = dict(scores)
    for qid, q in pq.questions.items():
        for parent in q.parents:
            if parent == 0:
                continue
            if parent not in out:
                raise DependencyError(f"{pq.item_id}: question {qid} depends on missing proposition {parent}")
            if out[parent] == 0:
                out[qid] = 0.0
                break
    return out


def tile_score(pq: PromptQuestions, answers: Mapping[int, str]) -> tuple[float, dict[int, float]]:
    """(mean dependency-adjusted score, raw scores) for one tile; answers keyed by question id."""
    raw = raw_scores({qid: answers.get(qid, "") for qid in pq.questions})
    adjusted = apply_dependencies(pq, raw)
    return sum(adjusted.values()) / len(adjusted), raw


def score_prompt(pq: PromptQuestions, tiles: Sequence[Mapping[int, str]], mode: str = "official") -> dict[str, Any]:
    """Score one prompt's tiles. Returns {score, tile_scores, category_raw: {qid: raw used for categories}}."""
    if not pq.questions:
        raise ValueError(f"{pq.item_id}: no questions")
    if not tiles:
        raise ValueError(f"{pq.item_id}: no tiles")
    tile_scores, raws = [], []
    for answers in tiles:
        s, raw = tile_score(pq, answers)
        tile_scores.append(s)
        raws.append(raw)
    if mode == "official":
        category_raw = raws[-1]  # only the last tile feeds the breakdown (ELLA issue #60)
    else:
        category_raw = {qid: sum(r[qid] for r in raws) / len(raws) for qid in pq.questions}
    return {"score": sum(tile_scores) / len(tile_scores), "tile_scores": tile_scores, "category_raw": category_raw}


def aggregate(prompts: Mapping[str, PromptQuestions], answered: Mapping[str, Sequence[Mapping[int, str]]],
              mode: str = "official") -> dict[str, Any]:
    """Benchmark score and L1/L2 breakdown from recorded answers.

    ``answered[item_id]`` is the list of tiles, each {question id: answer}. Prompts whose graph has
    a dangling dependency (only possible in official mode) are listed under ``dropped``.
    """
    scores: dict[str, float] = {}
    dropped: dict[str, str] = {}
    cat: dict[str, list[float]] = {}
    cat_l1: dict[str, list[float]] = {}
    for item_id, tiles in answered.items():
        pq = prompts.get(item_id)
        if pq is None:
            dropped[item_id] = "no questions for this item in the CSV"
            continue
        try:
            res = score_prompt(pq, tiles, mode)
        except DependencyError as exc:
            dropped[item_id] = str(exc)
            continue
        scores[item_id] = res["score"]
        for qid, q in pq.questions.items():
            cat.setdefault(q.category, []).append(res["category_raw"][qid])
            cat_l1.setdefault(q.category_l1, []).append(res["category_raw"][qid])
    l1 = {c: _mean100(cat_l1[c]) for c in L1_CATEGORIES if c in cat_l1}
    l1.update({c: _mean100(v) for c, v in cat_l1.items() if c not in l1})
    return {
        "mode": mode,
        "overall": _mean100(list(scores.values())) if scores else None,
        "l1": l1,
        "l2": {c: _mean100(v) for c, v in sorted(cat.items())},
        "questions_per_l2": {c: len(v) for c, v in sorted(cat.items())},
        "scored_prompts": len(scores),
        "dropped": dropped,
        "prompt_scores": scores,
    }


def _mean100(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values)


def question_union(rows: Iterable[Mapping[str, Any]]) -> dict[str, PromptQuestions]:
    """All questions (the ``fixed`` graph): what the VQA model is asked, so both modes can be scored."""
    return build_questions(list(rows), "fixed")
