"""Central aggregation: per-item records -> benchmark numbers and coverage for one NFE.

Always from per-item records (never from per-shard means), through the pure rule functions, and
always with coverage: expected vs generated vs scored vs skipped vs failed vs missing, plus the
first failures with their errors. Nothing drops out of the denominator without being counted.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from evals.dpg import rules as dpg_rules
from evals.geneval import rules as geneval_rules
from evals.prompts import Item
from evals.wise import rules as wise_rules

MAX_LISTED_FAILURES = 20


def coverage(items: Sequence[Item], nfe: int, latest: Mapping[tuple[int, str], dict], generated: set[str],
             gen_errors: Mapping[str, str]) -> dict[str, Any]:
    counts = {"expected": len(items), "generated": 0, "scored": 0, "skipped": 0, "failed": 0, "missing": 0}
    failures = []
    for it in items:
        rec = latest.get((nfe, it.key))
        counts["generated"] += it.key in generated
        if rec is not None and rec["status"] in ("scored", "skipped", "failed"):
            counts[rec["status"]] += 1
            if rec["status"] != "scored":
                failures.append({"key": it.key, "stage": "score", "status": rec["status"],
                                 "error": str(rec.get("error", ""))[:300]})
        elif it.key in gen_errors:
            counts["failed"] += 1
            failures.append({"key": it.key, "stage": "generate", "status": "failed", "error": gen_errors[it.key][:300]})
        else:
            counts["missing"] += 1
    counts["complete"] = counts["scored"] == counts["expected"]
    counts["failures"] = failures[:MAX_LISTED_FAILURES]
    reasons: dict[str, int] = {}
    for f in failures:
        text = f"{f['stage']} {f['status']}: {(f['error'].strip().splitlines() or ['no reason given'])[0][:160]}"
        reasons[text] = reasons.get(text, 0) + 1
    counts["reasons"] = reasons
    return counts


def _scored(items: Sequence[Item], nfe: int, latest: Mapping[tuple[int, str], dict]) -> list[tuple[Item, dict]]:
    return [(it, latest[(nfe, it.key)]) for it in items
            if (nfe, it.key) in latest and latest[(nfe, it.key)]["status"] == "scored"]


def geneval(items: Sequence[Item], nfe: int, latest: Mapping[tuple[int, str], dict], images_per_prompt: int) -> dict:
    images = []
    for it, rec in _scored(items, nfe, latest):
        for im in rec["data"]["images"]:
            images.append({"tag": rec["data"]["tag"], "correct": im["correct"], "prompt_index": it.key})
    res = geneval_rules.aggregate(images)
    res["images"] = {"expected": len(items) * images_per_prompt, "scored": len(images)}
    res["breakdown"] = res.pop("per_tag")
    return res


def dpg(items: Sequence[Item], nfe: int, latest: Mapping[tuple[int, str], dict], rows: Sequence[Mapping[str, Any]],
        mode: str) -> dict:
    answered = {it.key: [{int(q): a for q, a in tile.items()} for tile in rec["data"]["tiles"]]
                for it, rec in _scored(items, nfe, latest)}
    by_mode = {m: dpg_rules.aggregate(dpg_rules.build_questions(rows, m), answered, m) for m in dpg_rules.MODES}
    head = by_mode[mode]
    for m in by_mode.values():
        m.pop("prompt_scores", None)
    return {"mode": mode, "overall": head["overall"], "breakdown": head["l1"], "l2": head["l2"],
            "dropped_official_quirk": sorted(by_mode["official"]["dropped"]),
            "modes": {m: {"overall": v["overall"], "l1": v["l1"], "scored_prompts": v["scored_prompts"],
                          "dropped": v["dropped"]} for m, v in by_mode.items()},
            "questions_per_l2": head["questions_per_l2"]}


def wise(items: Sequence[Item], nfe: int, latest: Mapping[tuple[int, str], dict], protocol: str) -> dict:
    scores = {int(it.key): float(rec["data"]["score"]) for it, rec in _scored(items, nfe, latest)}
    res = wise_rules.aggregate(scores, protocol)
    res["breakdown"] = res.pop("categories")
    res["missing_ids"] = len(res["missing_ids"])  # a count; the ids are in coverage/records
    return res


def digits(items: Sequence[Item], nfe: int, latest: Mapping[tuple[int, str], dict], rules) -> dict:
    from evals.digits.rules import aggregate as digits_aggregate

    return digits_aggregate([rec["data"] for _, rec in _scored(items, nfe, latest)], rules)
