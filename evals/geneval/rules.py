"""GenEval's scoring rules as pure functions (BENCHMARKS.md §1.3-1.4).

No model inference lives here: detections come in as plain ``Detection`` objects and colour
classification as a callable, so every rule can be checked on hand-built cases. The constants are
the official defaults of ``evaluation/evaluate_images.py`` (djghosh13/geneval at af4902f); a
``GenEvalRules`` that differs from them makes the report say "non-official rules".

Per image:
  1. keep detections with score > 0.3 (0.9 when the tag is ``counting``), best first, at most 16
     per class, then optional greedy NMS (IoU threshold 1.0 = disabled);
  2. ``include`` entries (AND, in order): the top-n detections of the class must exist, then (if
     asked) at least n of exactly those n crops must have the colour, then (if asked, and only if the
     colour passed) every one of them must stand in the relation to every matched object of the
     referenced earlier entry;
  3. ``exclude`` entries: the image fails if it has >= count kept detections of the class.
Aggregation: per tag the fraction of correct images; overall = unweighted mean over tags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
# The three CLIP templates per colour c and class X; the classifier averages their embeddings.
COLOR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")


@dataclass(frozen=True)
class GenEvalRules:
    """The evaluator's knobs; the defaults are the official ones."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    nms_threshold: float = 1.0  # 1.0 disables NMS, as in the official script
    position_threshold: float = 0.1

    def is_official(self) -> bool:
        return self == GenEvalRules()


@dataclass
class Detection:
    """One detected instance: box [x1, y1, x2, y2] in pixels, confidence, optional HxW bool mask."""

    box: tuple[float, float, float, float]
    score: float
    mask: Any = field(default=None, repr=False)


ColorFn = Callable[[str, Sequence[Detection]], list[str]]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU in the old pixel-inclusive convention (+1 on widths and heights), as the official NMS."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ix * iy
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return float(inter / (area_a + area_b - inter))


def confidence_threshold(tag: str, rules: GenEvalRules = GenEvalRules()) -> float:
    return rules.counting_threshold if tag == "counting" else rules.threshold


def keep_detections(per_class: Mapping[str, Sequence[Detection]], tag: str,
                    rules: GenEvalRules = GenEvalRules()) -> dict[str, list[Detection]]:
    """Threshold (strictly greater), sort by score, cap at ``max_objects``, then greedy NMS.

    Classes left with no detection are absent from the result, as in the official dict.
    """
    thr = confidence_threshold(tag, rules)
    kept: dict[str, list[Detection]] = {}
    for name, dets in per_class.items():
        order = sorted((d for d in dets if d.score > thr), key=lambda d: -d.score)[: rules.max_objects]
        chosen: list[Detection] = []
        while order:
            best = order.pop(0)
            chosen.append(best)
            if rules.nms_threshold < 1:
                order = [d for d in order if box_iou(best.box, d.box) < rules.nms_threshold]
        if chosen:
            kept[name] = chosen
    return kept


def relative_position(a: Detection, b: Detection, margin: float = 0.1) -> set[str]:
    """Relations of A relative to B, from box centres with a size-proportional dead zone.

    Each axis of the centre offset is shrunk towards 0 by ``margin * (size_a + size_b)``; if both
    shrunk components are below 1e-3 there is no relation. Otherwise the shrunk vector is divided by
    the norm of the *original* offset and a component beyond ±0.5 names a relation (y grows down).
    """
    ax1, ay1, ax2, ay2 = map(float, a.box[:4])
    bx1, by1, bx2, by2 = map(float, b.box[:4])
    offset = np.array([(ax1 + ax2) / 2 - (bx1 + bx2) / 2, (ay1 + ay2) / 2 - (by1 + by2) / 2])
    sizes = np.array([abs(ax2 - ax1) + abs(bx2 - bx1), abs(ay2 - ay1) + abs(by2 - by1)])
    revised = np.maximum(np.abs(offset) - margin * sizes, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def evaluate_detections(metadata: Mapping[str, Any], kept: Mapping[str, Sequence[Detection]],
                        classify_colors: ColorFn | None = None,
                        rules: GenEvalRules = GenEvalRules()) -> tuple[bool, str]:
    """Judge one image from its kept detections; returns (correct, reason).

    ``classify_colors(class_name, detections)`` returns one colour name per detection; it is only
    called for the top-n detections of an include entry that asks for a colour.
    """
    correct = True
    reasons: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], int(req["count"])
        found = list(kept.get(name, []))[:count]
        matched = True
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                if classify_colors is None:
                    raise ValueError(f"prompt needs colour '{req['color']}' but no colour classifier was given")
                colors = list(classify_colors(name, found))
                n_ok = colors.count(req["color"])
                if n_ok < count:
                    correct = matched = False
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    reasons.append(f"expected {req['color']} {name}>={count}, found {n_ok} {req['color']}; and {seen}")
            if "position" in req and matched:
                rel, group = req["position"][0], int(req["position"][1])
                targets = matched_groups[group] if group < len(matched_groups) else None
                if targets is None:
                    correct = matched = False
                    reasons.append(f"no target for {name} to be {rel}")
                else:
                    for obj in found:
                        for target in targets:
                            actual = relative_position(obj, target, rules.position_threshold)
                            if rel not in actual:
                                correct = matched = False
                                reasons.append(f"expected {name} {rel} target, found {' and '.join(sorted(actual))} target")
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        name, count = req["class"], int(req["count"])
        n = len(kept.get(name, []))
        if n >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {n}")
    return correct, "\n".join(reasons)


def evaluate_image(metadata: Mapping[str, Any], per_class: Mapping[str, Sequence[Detection]],
                   classify_colors: ColorFn | None = None,
                   rules: GenEvalRules = GenEvalRules()) -> tuple[bool, str]:
    """Threshold/cap/NMS the raw detections for this prompt's tag, then apply the include/exclude rules."""
    kept = keep_detections(per_class, metadata["tag"], rules)
    return evaluate_detections(metadata, kept, classify_colors, rules)


def aggregate(images: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-tag fraction of correct images and their unweighted mean (the headline number).

    ``images``: one mapping per scored image with ``tag``, ``correct`` and ``prompt_index``. Tags
    with no scored image are left out of the mean and listed under ``missing_tags``.
    """
    by_tag: dict[str, list[bool]] = {}
    by_prompt: dict[Any, bool] = {}
    for im in images:
        by_tag.setdefault(im["tag"], []).append(bool(im["correct"]))
        key = im.get("prompt_index")
        by_prompt[key] = by_prompt.get(key, False) or bool(im["correct"])
    per_tag = {t: float(np.mean(v)) for t, v in by_tag.items()}
    ordered = {t: per_tag[t] for t in TAGS if t in per_tag}
    ordered.update({t: v for t, v in per_tag.items() if t not in ordered})
    n = sum(len(v) for v in by_tag.values())
    return {
        "overall": float(np.mean(list(ordered.values()))) if ordered else None,
        "per_tag": ordered,
        "images_per_tag": {t: len(by_tag[t]) for t in ordered},
        "missing_tags": [t for t in TAGS if t not in ordered],
        "correct_images": (sum(sum(v) for v in by_tag.values()) / n) if n else None,
        "correct_prompts": (sum(by_prompt.values()) / len(by_prompt)) if by_prompt else None,
    }
