"""What a sweep leaves behind: the trial table, the metric-vs-λ plot and ready-to-run best configs.

    trials.md / trials.csv     one row per trial: searched values, last step, metric, status
    metric_vs_lambda.png       the stopping metric at each trial's last report against λ
    best.json                  the winner's values and metric
    best_train_qwen.yaml       a complete TrainConfig for jobs/train_qwen.py with the winner's values
                               (qwen: the swept TrainConfig; digits: the sweep's ``qwen`` section with
                               the winner's λ and lr), then the sweep's ``promote`` overrides
    best_study.yaml            digits only: a StudyConfig for jobs/small_scale_study.py (TwinFlow on
                               digits with the winner's method and training settings)

Status: ``error`` (the trial raised), ``completed`` (it reached max_t), ``stopped early`` (it ended
before max_t without an error: only the scheduler ends a trial there). The winner is the best
last-reported metric among completed trials: trials stopped early were compared at a shorter
horizon, so their numbers are not comparable.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

from twinflow.config.tree import build, dump_yaml, to_dict
from twinflow.tune.config import LAM_PATH, LR_PATH, SweepConfig

COMPLETED, STOPPED, ERROR = "completed", "stopped early", "error"
EXTRA_METRICS = ("recall_1nfe", "digits_recall_1nfe", "digits_diversity_ratio_1nfe", "digits_accuracy_1nfe",
                 "loss/total")
"""Reported beside the stopping metric in the table when trials report them."""


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def collect_rows(grid, cfg: SweepConfig) -> list[dict[str, Any]]:
    """One dict per trial from Tune's ResultGrid, in trial order."""
    paths = list(cfg.search_paths())
    extra = [m for m in EXTRA_METRICS if m != cfg.metric]
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        params = result.config or {}
        step = _num(metrics.get("step"))
        reports = int(metrics.get("training_iteration") or 0)
        if result.error is not None:
            status = ERROR
        elif step is not None and step >= cfg.max_t:
            status = COMPLETED
        else:
            status = STOPPED
        row = {"trial": metrics.get("trial_id") or os.path.basename(str(result.path)).split("_")[-1],
               **{p: params.get(p) for p in paths},
               "lam": params.get(LAM_PATH, _base_value(cfg, LAM_PATH)),
               "lr": params.get(LR_PATH[cfg.target], _base_value(cfg, LR_PATH[cfg.target])),
               "step": int(step) if step is not None else None, "reports": reports,
               cfg.metric: _num(metrics.get(cfg.metric)),
               **{m: _num(metrics.get(m)) for m in extra if m in metrics},
               "status": status,
               "error": str(result.error).strip().splitlines()[-1][:200] if result.error is not None else ""}
        rows.append(row)
    return rows


def _base_value(cfg: SweepConfig, dotted: str) -> Any:
    node: Any = to_dict(cfg.digits if cfg.target == "digits" else cfg.qwen)
    for part in dotted.split("."):
        node = node[part]
    return node


def pick_winner(rows: list[dict], cfg: SweepConfig) -> dict | None:
    pool = [r for r in rows if r["status"] == COMPLETED and r.get(cfg.metric) is not None]
    if not pool:
        return None
    sign = 1 if cfg.mode == "min" else -1
    return min(pool, key=lambda r: sign * r[cfg.metric])


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table_columns(rows: list[dict], cfg: SweepConfig) -> list[str]:
    searched = [p for p in cfg.search_paths() if p not in (LAM_PATH, LR_PATH[cfg.target])]
    metrics = [cfg.metric] + [m for m in EXTRA_METRICS if m != cfg.metric and any(m in r for r in rows)]
    return ["trial", "lam", "lr", *searched, "step", "reports", *metrics, "status", "error"]


def write_results(rows: list[dict], winner: dict | None, cfg: SweepConfig, out: str) -> dict[str, str]:
    os.makedirs(out, exist_ok=True)
    cols = table_columns(rows, cfg)
    files = {"csv": os.path.join(out, "trials.csv"), "md": os.path.join(out, "trials.md"),
             "plot": os.path.join(out, "metric_vs_lambda.png"), "best": os.path.join(out, "best.json")}
    with open(files["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    lines = [f"# Sweep {cfg.name} ({cfg.target}): {cfg.metric} ({cfg.mode}), max_t={cfg.max_t} steps", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        mark = " **(best)**" if winner is not None and r["trial"] == winner["trial"] else ""
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" + mark)
    counts = {s: sum(r["status"] == s for r in rows) for s in (COMPLETED, STOPPED, ERROR)}
    lines += ["", ", ".join(f"{n} {s}" for s, n in counts.items())]
    if winner is None:
        lines.append("\nNo trial completed: no best config written.")
    with open(files["md"], "w") as f:
        f.write("\n".join(lines) + "\n")
    save_metric_plot(rows, cfg, files["plot"])
    with open(files["best"], "w") as f:
        json.dump({"metric": cfg.metric, "mode": cfg.mode, "winner": winner}, f, indent=2, default=str)
    if winner is not None:
        files.update(write_best_configs(winner, cfg, out))
    return files


def save_metric_plot(rows: list[dict], cfg: SweepConfig, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    styles = {COMPLETED: ("o", "completed"), STOPPED: ("x", "stopped early"), ERROR: ("s", "error")}
    lrs = [r["lr"] for r in rows if _num(r.get("lr"))]
    norm = matplotlib.colors.LogNorm(min(lrs), max(lrs)) if lrs and min(lrs) < max(lrs) else None
    scatter = None
    for status, (marker, label) in styles.items():
        pts = [r for r in rows if r["status"] == status and r.get(cfg.metric) is not None and _num(r.get("lam")) is not None]
        if pts:
            scatter = ax.scatter([r["lam"] for r in pts], [r[cfg.metric] for r in pts], marker=marker, label=label,
                                 c=[r["lr"] for r in pts] if norm else None, norm=norm, cmap="viridis" if norm else None)
    if scatter is not None and norm is not None:
        fig.colorbar(scatter, ax=ax, label="learning rate")
    ax.axvline(1 / 3, color="grey", ls=":", lw=1)
    ax.set_xlabel("λ")
    ax.set_ylabel(f"{cfg.metric} ({'lower' if cfg.mode == 'min' else 'higher'} is better)")
    ax.set_title(f"{cfg.name}: {cfg.metric} at each trial's last report")
    if rows:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------
# best configs
# ---------------------------------------------------------------------------


def winner_params(winner: dict, cfg: SweepConfig) -> dict[str, Any]:
    return {p: winner[p] for p in cfg.search_paths() if winner.get(p) is not None}


def best_train_config(winner: dict, cfg: SweepConfig):
    """The TrainConfig for jobs/train_qwen.py: the swept one (qwen) or the sweep's qwen section with
    the digits winner's λ and lr (digits), then ``promote``; validated like the job validates it."""
    from twinflow.train.config import TrainConfig
    from twinflow.tune.config import trial_target, with_params

    if cfg.target == "qwen":
        base = trial_target(cfg, winner_params(winner, cfg))
    else:
        base = with_params(cfg.qwen, {LAM_PATH: float(winner["lam"]), LR_PATH["qwen"]: float(winner["lr"])}, "qwen")
    # Its own run name (the trials' and the demo's names are taken): the printed command must work as it is.
    return build(TrainConfig, base, None, [f"run.name={cfg.name}-best", *cfg.promote])


def best_study_config(winner: dict, cfg: SweepConfig):
    from twinflow.study.config import Methods, StudyConfig
    from twinflow.tune.config import trial_target

    target = trial_target(cfg, winner_params(winner, cfg))
    study = StudyConfig(out=f"runs/study-{cfg.name}-best", datasets=["digits"], methods=["twinflow"],
                        method=Methods(twinflow=target.twinflow), workers=target.workers, digits=target.train)
    return build(StudyConfig, study)


def write_best_configs(winner: dict, cfg: SweepConfig, out: str) -> dict[str, str]:
    values = ", ".join(f"{k}={_fmt(v)}" for k, v in winner_params(winner, cfg).items())
    head = (f"# Best trial {winner['trial']} of sweep {cfg.name} ({cfg.target}): {values}; "
            f"{cfg.metric}={_fmt(winner[cfg.metric])}\n")
    files = {"train_qwen": os.path.join(out, "best_train_qwen.yaml")}
    note = ""
    if cfg.target == "digits":
        note = ("# λ carries over from the digits proxy; its learning rate was tuned for a small MLP and is only\n"
                "# a starting point for this model: check optim.lr (or sweep it on the qwen target).\n")
    with open(files["train_qwen"], "w") as f:
        f.write(head + note + "# Run: python jobs/train_qwen.py --config " + files["train_qwen"] + "\n"
                + dump_yaml(best_train_config(winner, cfg)))
    if cfg.target == "digits":
        files["study"] = os.path.join(out, "best_study.yaml")
        with open(files["study"], "w") as f:
            f.write(head + "# Run: python jobs/small_scale_study.py --config " + files["study"] + "\n"
                    + dump_yaml(best_study_config(winner, cfg)))
    return files
