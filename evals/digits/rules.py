"""The digits benchmark: GenEval-shaped, for the miniature paper's small digits base (twinflow/mini).

Prompts: for every class c in 0..9 and every caption template k, the training caption
``caption_for(c, k)`` ("a handwritten digit seven", ...), ``images_per_prompt`` seeds each.

Per image (the scorer actor, ``score_images``): the image is brought back to the digits' own 8×8
space (``images_to_digits``) and a classifier trained on real digits (``DigitsJudge``, RBF SVM,
held-out accuracy in the report) gives its class and probability; the image is *correct* when the
predicted class is the prompted one with probability ≥ ``threshold``.

Per NFE (central, from the records, ``aggregate``): accuracy per class and overall (mean over
classes), and against the real digits rendered at the same size (``load_digits_at``) in the
judge's fixed 32-d PCA feature space: Fréchet distance, k-NN precision and recall (k = 3) and the
within-prompt diversity (mean pairwise feature distance of one prompt's images) with its ratio to
the real digits' within-class diversity. Accuracy alone cannot show a collapsed one-step model (it
draws class means, which classify well); recall, diversity and Fréchet distance do. The numbers are
the study's (twinflow.study.metrics): one implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np

CLASSES = tuple(range(10))
DIGIT_COLUMNS = [str(c) for c in CLASSES] + ["frechet", "precision", "recall", "diversity_ratio"]


@dataclass(frozen=True)
class DigitsRules:
    threshold: float = 0.5
    """Minimum classifier probability of the prompted class for an image to count as correct."""
    k: int = 3
    feature_dims: int = 32
    size: int = 32
    """Image side the real reference is rendered at (the base's resolution)."""
    seed: int = 0


@lru_cache(maxsize=4)
def judge_for(rules: DigitsRules):
    """The fitted judge (PCA space, classifier, real statistics) for these rules; cached per process."""
    from twinflow.study.datasets import load_digits_at
    from twinflow.study.metrics import DigitsJudge

    return DigitsJudge.fit(load_digits_at(rules.size), dims=rules.feature_dims, seed=rules.seed, classifier="svc")


def digit_prompts(templates: int = 2) -> list[tuple[str, str, dict]]:
    """(key, prompt, meta) for every class × caption template, in a fixed order (twinflow.data.digits)."""
    from twinflow.data.digits import digit_prompts as prompts

    return [(key, text, {"label": label, "template": int(key.split("-")[1])}) for key, text, label in prompts(templates)]


def score_images(images, label: int, rules: DigitsRules) -> list[dict[str, Any]]:
    """Per-image record data: predicted class, its probability, correct, and the 8×8 digit (rounded)."""
    from twinflow.study.datasets import images_to_digits

    x = images_to_digits(images)
    pred, conf = judge_for(rules).classify(x)
    return [{"index": i, "pred": int(p), "conf": round(float(c), 4),
             "correct": bool(int(p) == int(label) and c >= rules.threshold),
             "digit": [round(float(v), 3) for v in row]} for i, (p, c, row) in enumerate(zip(pred, conf, x))]


def aggregate(records: Sequence[Mapping[str, Any]], rules: DigitsRules) -> dict[str, Any]:
    """Numbers of one NFE from its scored records ({"label", "key", "images": [...]}): the study's
    ``digits_quality`` on the images' 8×8 digits (correctness re-derived from the same classifier)."""
    from twinflow.study.metrics import digits_quality

    digits, labels, prompts = [], [], []
    for rec in records:
        for im in rec["images"]:
            digits.append(im["digit"])
            labels.append(int(rec["label"]))
            prompts.append(rec["key"])
    if not digits:
        return {"overall": None, "breakdown": {}, "images": 0}
    groups = np.unique(np.asarray(prompts), return_inverse=True)[1]
    q = digits_quality(judge_for(rules), np.asarray(digits), np.asarray(labels), groups, rules.threshold, rules.k)
    per_class = {str(c): v for c, v in q["per_class"].items()}
    complete = len(per_class) == len(CLASSES)
    return {"overall": q["accuracy"] if complete else None, "accuracy": q["accuracy"],
            "breakdown": {**per_class, **{m: q[m] for m in ("frechet", "precision", "recall", "diversity",
                                                            "diversity_ratio")}},
            "images": len(digits)}


def reference_rows(rules: DigitsRules) -> list[dict[str, Any]]:
    """Real digits against themselves (two random halves): the floor each metric can reach here."""
    judge = judge_for(rules)
    floor = judge.real_floor(rules.seed, rules.k)
    return [{"model": f"real digits (classifier held-out accuracy {judge.heldout_accuracy:.3f}; halves for "
                      f"Fréchet/precision/recall)", "overall": judge.heldout_accuracy,
             "breakdown": {"frechet": floor["frechet"], "precision": floor["precision"], "recall": floor["recall"],
                           "diversity_ratio": 1.0}, "kind": "floor"}]
