"""results.md tables (rows = method × NFE) and PNG sample grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from twinflow.study.datasets import Digits, digits_to_uint8

COLUMNS = {
    "digits": ["frechet", "precision", "recall", "diversity", "accuracy"],
    "mixture2d": ["sliced_w2", "mode_coverage", "mode_balance", "off_mode"],
}
LOWER_IS_BETTER = {"frechet", "sliced_w2", "off_mode"}


def _cell(row: dict, col: str, seeds: int) -> str:
    """mean ± std over training seeds when there are several (study/seeds.py), else over evaluation
    seeds; the mean alone with one of each (its std is no measurement)."""
    if row.get("train_seeds", 1) > 1:
        return f"{row[col]:.3f} ± {row[col + '_train_std']:.3f}"
    return f"{row[col]:.3f} ± {row[col + '_std']:.3f}" if seeds > 1 else f"{row[col]:.3f}"


def _spread(cfg) -> str:
    if cfg.train_seeds > 1:
        return f"{cfg.train_seeds} training seeds × {cfg.eval.seeds} eval seed(s); mean ± std over training seeds"
    return f"{cfg.eval.seeds} eval seed(s)" + ("; mean ± std" if cfg.eval.seeds > 1 else "")


def write_markdown(path: Path, results: dict, cfg) -> str:
    lines = ["# Small-scale study", ""]
    lines += _lambda_table(results.get("lam_sweep", {}), results.get("reference", {}), cfg)
    for ds in cfg.datasets:
        if ds not in results:
            continue
        cols = COLUMNS[ds]
        steps = getattr(cfg, ds).steps
        lines += [f"## {ds} ({steps} steps, {_spread(cfg)})", "",
                  "| method | NFE | " + " | ".join(f"{c} {'↓' if c in LOWER_IS_BETTER else '↑'}" for c in cols)
                  + " | sampler |",
                  "|---|---|" + "---|" * (len(cols) + 1)]
        for method, by_nfe in results[ds].items():
            for key, row in by_nfe.items():
                cells = [_cell(row, c, cfg.eval.seeds) for c in cols]
                lines.append(f"| {method} | {key.removeprefix('nfe_')} | " + " | ".join(cells) + f" | {row['sampler']} |")
        ref = results.get("reference", {}).get(ds)
        if ref and ds in results:
            cells = [f"{ref[c]:.3f}" if c in ref else "—" for c in cols]
            lines.append("| real vs real | — | " + " | ".join(cells) + " | floor |")
        lines.append("")
        lines += _ratio_table(ds, results.get("ratios", {}).get(ds, {}))
    text = "\n".join(lines)
    path.write_text(text)
    return text


def _ratio_table(ds: str, ratios: dict) -> list[str]:
    """x / (FM at 100 NFE), seed by seed, and the floor-corrected (x − floor) / (FM − floor)."""
    if not ratios:
        return []
    from twinflow.study.seeds import HEADLINE

    metric = HEADLINE[ds]
    several = any(r.get("train_seeds", 1) > 1 for by_nfe in ratios.values() for r in by_nfe.values())
    how = "per training seed, then mean ± std" if several else "one training seed"
    lines = [f"{metric} relative to flow matching at 100 NFE ({how}; floor = real vs real):", "",
             "| method | NFE | ratio | floor-corrected |", "|---|---|---|---|"]
    cell = (lambda m, s: f"{m:.2f} ± {s:.2f}") if several else (lambda m, s: f"{m:.2f}")  # noqa: E731
    uncorrectable = False
    for method, by_nfe in ratios.items():
        for key, r in by_nfe.items():
            corrected = r["floor_corrected"]
            uncorrectable |= corrected is None
            lines.append(f"| {method} | {key.removeprefix('nfe_')} | {cell(r['ratio'], r['ratio_std'])} | "
                         f"{'n/a' if corrected is None else cell(corrected, r['floor_corrected_std'])} |")
    if uncorrectable:
        lines += ["", "n/a: flow matching at 100 NFE is not above the real-vs-real floor on every training seed, "
                      "so there is no distance above the floor to take a share of."]
    return lines + [""]


def _lambda_table(sweep: dict, reference: dict, cfg) -> list[str]:
    lines = []
    for ds, by_lam in sweep.items():
        cols = COLUMNS[ds]
        lines += [f"## λ sweep on {ds}: TwinFlow at 1 NFE ({getattr(cfg, ds).steps} steps, {_spread(cfg)})",
                  "", "| λ | " + " | ".join(f"{c} {'↓' if c in LOWER_IS_BETTER else '↑'}" for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for lam, by_nfe in sorted(by_lam.items(), key=lambda kv: float(kv[0])):
            row = by_nfe["nfe_1"]
            lines.append(f"| {float(lam):.3f} | " + " | ".join(_cell(row, c, cfg.eval.seeds) for c in cols) + " |")
        ref = reference.get(ds, {})
        lines += ["| real vs real | " + " | ".join(f"{ref[c]:.3f}" if c in ref else "—" for c in cols) + " |", ""]
    return lines


def save_lambda_plot(path: Path, sweep: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for ds, by_lam in sweep.items():
        cols = COLUMNS[ds][:3]
        lams = sorted(by_lam, key=float)
        fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.2))
        for ax, c in zip(np.atleast_1d(axes), cols):
            ys = [by_lam[k]["nfe_1"][c] for k in lams]
            row = by_lam[lams[0]]["nfe_1"]
            spread = c + ("_train_std" if row.get("train_seeds", 1) > 1 else "_std")  # the spread the table gives
            es = [by_lam[k]["nfe_1"][spread] for k in lams]
            ax.errorbar([float(k) for k in lams], ys, yerr=es, marker="o")
            ax.axvline(1 / 3, color="grey", ls=":", lw=1)
            ax.set_xlabel("λ")
            ax.set_title(f"{ds}: {c} at 1 NFE")
        fig.tight_layout()
        fig.savefig(path.with_name(f"{path.stem}_{ds}{path.suffix}") if len(sweep) > 1 else path, dpi=80)
        plt.close(fig)


def save_ablation_plot(path: Path, results: dict, cells: list[str], nfe: str = "nfe_1") -> None:
    """One panel per dataset: the headline metric at ``nfe`` of every ablation cell (study/ablation.py), with
    the training-seed spread as error bars and flow matching at 100 NFE as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from twinflow.study.seeds import HEADLINE, REFERENCE

    datasets = [ds for ds in HEADLINE if ds in results and any(c in results[ds] for c in cells)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 0.45 * len(cells) + 1.4), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        metric, names = HEADLINE[ds], [c for c in cells if c in results[ds]]
        rows = [results[ds][c][nfe] for c in names]
        spread = [r.get(f"{metric}_train_std", r.get(f"{metric}_std", 0.0)) for r in rows]
        ax.barh(range(len(names)), [r[metric] for r in rows], xerr=spread, color="tab:blue", alpha=0.7)
        ax.set_yticks(range(len(names)), [n.removeprefix("twinflow-") for n in names])
        ax.invert_yaxis()
        ref = results[ds].get(REFERENCE[0], {}).get(REFERENCE[1])
        if ref is not None:
            ax.axvline(ref[metric], color="k", ls="--", lw=1, label="flow matching, 100 NFE")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel(f"{metric} at {nfe.removeprefix('nfe_')} NFE (lower is better)")
        ax.set_title(ds)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


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
        ax.set_title(f"{k} NFE")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{dataset}: {method}")
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
