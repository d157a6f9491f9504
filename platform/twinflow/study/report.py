"""results.md tables (rows = method × NFE) and PNG sample grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from twinflow.study.datasets import Digits, Mixture2D, digits_to_uint8

COLUMNS = {
    "digits": ["frechet", "precision", "recall", "diversity", "accuracy"],
    "mixture2d": ["sliced_w2", "mode_coverage", "mode_balance", "off_mode"],
}
LOWER_IS_BETTER = {"frechet", "sliced_w2", "off_mode"}


def write_markdown(path: Path, results: dict, cfg) -> str:
    lines = ["# Small-scale study", ""]
    for ds in cfg.datasets:
        if ds not in results:
            continue
        cols = COLUMNS[ds]
        steps = getattr(cfg, ds).steps
        lines += [f"## {ds} ({steps} steps, {cfg.eval.seeds} eval seed(s); mean ± std)", "",
                  "| method | NFE | " + " | ".join(f"{c} {'↓' if c in LOWER_IS_BETTER else '↑'}" for c in cols)
                  + " | sampler |",
                  "|---|---|" + "---|" * (len(cols) + 1)]
        for method, by_nfe in results[ds].items():
            for key, row in by_nfe.items():
                cells = [f"{row[c]:.3f} ± {row[c + '_std']:.3f}" for c in cols]
                lines.append(f"| {method} | {key.removeprefix('nfe_')} | " + " | ".join(cells) + f" | {row['sampler']} |")
        ref = results.get("reference", {}).get(ds)
        if ref:
            cells = [f"{ref[c]:.3f}" if c in ref else "—" for c in cols]
            lines.append("| real vs real | — | " + " | ".join(cells) + " | floor |")
        lines.append("")
    text = "\n".join(lines)
    path.write_text(text)
    return text


def save_grids(out: Path, dataset: str, method: str, samples: dict[int, torch.Tensor], data) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nfes = sorted(samples)
    fig, axes = plt.subplots(1, len(nfes), figsize=(3 * len(nfes), 3.2))
    axes = np.atleast_1d(axes)
    for ax, k in zip(axes, nfes):
        x = samples[k]
        if isinstance(data, Digits):
            ax.imshow(_digit_mosaic(x, data), cmap="gray_r", vmin=0, vmax=255)
        else:
            ax.scatter(x[:4000, 0], x[:4000, 1], s=1, alpha=0.4)
            c = data.centres
            ax.scatter(c[:, 0], c[:, 1], s=20, c="red", marker="x")
            ax.set_xlim(-3, 3)
            ax.set_ylim(-3, 3)
            ax.set_aspect("equal")
        ax.set_title(f"{method}, {k} NFE")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / f"samples_{dataset}_{method}.png", dpi=80)
    plt.close(fig)


def _digit_mosaic(x: torch.Tensor, data: Digits, per_class: int = 8) -> np.ndarray:
    """Rows = classes 0..9, first ``per_class`` samples of each (labels follow eval order)."""
    imgs = digits_to_uint8(x)
    labels = data.labels.numpy() if len(x) == len(data.labels) else np.repeat(np.arange(10), len(x) // 10)
    rows = []
    for c in range(10):
        idx = np.nonzero(labels == c)[0][:per_class]
        tiles = [np.pad(imgs[i], 1) for i in idx]
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)
