"""Training seeds: every study cell is a mean over independently trained runs, with its spread.

    cell = combine(per_seed)                  # per_seed: [{nfe_k: {metric: eval-seed mean, metric_std, ...}}]
    ratios = ratios_to_reference(cells, ...)  # x / FM 100-NFE and (x − floor) / (FM − floor), per seed

A cell keeps the schema of a single run's scores (``metric``: the mean, ``metric_std``: the evaluation-
seed spread, averaged over training seeds) and adds ``metric_train_std`` (the spread over training
seeds, 0 for one seed) and ``metric_per_seed``. A ratio is taken seed by seed (training seed k of the
method against training seed k of the reference), so the spread of the ratio is the spread of what a
user re-running the study would see; the floor-corrected figure removes the real-vs-real distance that
no generator can beat.
"""

from __future__ import annotations

import numpy as np

REFERENCE = ("fm", "nfe_100")
"""The cell every ratio is taken against: plain flow matching at 100 NFE."""
HEADLINE = {"digits": "frechet", "mixture2d": "sliced_w2"}
"""The lower-is-better metric a dataset's ratios are about."""


def combine(per_seed: list[dict]) -> dict:
    """{nfe_k: row} of several training seeds -> one {nfe_k: row} with means and both spreads."""
    out: dict = {}
    for key in per_seed[0]:
        rows = [s[key] for s in per_seed]
        metrics = [m for m, v in rows[0].items() if isinstance(v, (int, float)) and not m.endswith("_std")]
        row: dict = {}
        for m in metrics:
            values = [float(r[m]) for r in rows]
            row[m] = float(np.mean(values))
            row[f"{m}_std"] = float(np.mean([float(r.get(f"{m}_std", 0.0)) for r in rows]))
            row[f"{m}_train_std"] = float(np.std(values))
            row[f"{m}_per_seed"] = values
        row.update({k: v for k, v in rows[0].items() if not isinstance(v, (int, float))})  # e.g. the sampler
        row["train_seeds"] = len(rows)
        out[key] = row
    return out


def ratios_to_reference(cells: dict, floor: dict, metric: str) -> dict:
    """{method: {nfe_k: {ratio, ratio_std, floor_corrected, floor_corrected_std}}} of ``metric`` against
    the reference cell, seed by seed; {} when the study has no reference cell."""
    method, nfe = REFERENCE
    if method not in cells or nfe not in cells[method]:
        return {}
    ref = np.array(cells[method][nfe][f"{metric}_per_seed"])
    base = float(floor.get(metric, 0.0))
    # The correction means "share of the reference's distance above the floor"; where the reference is
    # not above the floor on every seed (digits: the floor compares two halves of ~900 images, generated
    # sets are scored against all 1,797, so it sits *above* a good model) it has no meaning: None.
    correctable = bool((ref > base).all())
    out: dict = {}
    for name, by_nfe in cells.items():
        for key, row in by_nfe.items():
            x = np.array(row[f"{metric}_per_seed"])
            if len(x) != len(ref):
                continue
            ratio = x / ref
            corrected = (x - base) / (ref - base) if correctable else None
            out.setdefault(name, {})[key] = {
                "ratio": float(ratio.mean()), "ratio_std": float(ratio.std()),
                "floor_corrected": float(corrected.mean()) if correctable else None,
                "floor_corrected_std": float(corrected.std()) if correctable else None,
                "floor": base, "train_seeds": len(x)}
    return out
