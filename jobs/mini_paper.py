"""The paper's table in miniature: a pretrained base distilled to one step, through the real jobs.

    python jobs/mini_paper.py                        # ~35 min on 2 cores (the base cached: see build_base.py)
    python jobs/mini_paper.py --quick                # shorter runs and sweep, ~15 min: plumbing, noisier
    python jobs/mini_paper.py --runs twinflow-lora,meanflow-lora,scm-lora --no-sweep   # TwinFlow vs its rivals
    python jobs/mini_paper.py --runs twinflow-lora,dmd2-lora,vsd-lora --no-sweep       # ... the fake-score ones
    python jobs/mini_paper.py --dry-run              # every run / evaluation / sweep it would launch

What it runs, each through its job's own front door (main(argv): the same presets, --config, --set):
  base       jobs/build_base.py's digits base (built when missing)
  runs       jobs/train_qwen.py from the base's latent cache, 2 Ray Train workers, DeepSpeed ZeRO-2:
               rcgm-lora       RCGM only (the paper's ablation: L_base on one-step/near/any rows, no L_adv,
                               no L_rectify), LoRA + LoRA-EMA teacher
               twinflow-lora   TwinFlow λ = 1/3, LoRA + LoRA-EMA teacher (the make-demo run)
               twinflow-full   TwinFlow λ = 1/3, full-parameter (+ E2), self teacher
               twinflow-unbiased-lora  twinflow-lora with twinflow_unbiased()'s losses (method/config.py UNBIASED)
               meanflow-lora   MeanFlow (finite-difference tangent), the same LoRA set-up; 1/2/4/8 NFE
               scm-lora        sCM (continuous-time consistency, finite-difference tangent); 1/2/4/8 NFE
               dmd2-lora       DMD2: the student and a fake-score adapter on one base, real score = adapters
                               off, 5 fake steps per student step; 1/2/4/8 NFE
               vsd-lora        VSD on the same machinery (ε-space weighting, 1 fake step)
  evals      jobs/evaluate.py --preset digits (the digits benchmark on the Ray actor pool): the base at
             1/2/4/100 NFE (its own Euler scheduler), each run's final/pipeline at 1/2/4 NFE
  λ curve    jobs/tune_lambda.py --preset digits-base-lam (Ray Tune; 1-NFE digits probe per trial)
and writes into ``--out``: results.json, results.md (the table, the targets and what holds), grid.png
(each model's NFE rows side by side) and quality_vs_nfe.png. Re-running the same command resumes:
finished runs and evaluations are reused, the sweep restores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
import _code_path  # noqa: E402,F401 - the submitted checkout first on sys.path (jobs/_code_path.py)

import yaml  # noqa: E402

from twinflow.method.config import UNBIASED  # noqa: E402

METRICS = ("accuracy", "frechet", "precision", "recall", "diversity_ratio")
RUNS = {
    "rcgm-lora": ("digits", {"twinflow": {"block_weights": {"one_step": 1, "near_diag": 1, "any_step": 1, "fake": 0},
                                          "rectify_coef": 0.0}}),
    "twinflow-lora": ("digits", {}),
    "twinflow-full": ("digits-full", {}),
    # twinflow_unbiased(): l2 unclipped near-diagonal rows + the real-velocity term (the study's loss ablation)
    "twinflow-unbiased-lora": ("digits", {"twinflow": UNBIASED}),
    # The paper's JVP-free rivals on the same base, data, steps and LoRA set-up (docs/METHOD.md §18); scored
    # up to 8 NFE, where the paper compares them with TwinFlow at 1. sCM's tangent warm-up: 20 % of the run.
    "meanflow-lora": ("digits", {"method": "meanflow"}),
    "scm-lora": ("digits", {"method": "scm", "scm": {"tangent_warmup": 300}}),
    # The fake-score rivals in their memory-light form: one base, the student and a "fake" adapter, the real
    # score the base with adapters off (train/fake_score.py); DMD2 5 fake steps per student step, VSD 1.
    "dmd2-lora": ("digits", {"method": "dmd2"}),
    "vsd-lora": ("digits", {"method": "vsd"}),
}
RIVAL_RUNS = ("meanflow-lora", "scm-lora")
DMD_RUNS = ("dmd2-lora", "vsd-lora")


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plan(out: Path, quick: bool) -> dict:
    steps = 400 if quick else 1500
    runs = {}
    for name, (preset, sets) in RUNS.items():
        config = {**sets, "run": {"name": f"mini-{name}", "storage_path": str(out / "runs"), "max_steps": steps,
                                  "checkpoint_every": steps}}
        runs[name] = {"preset": preset, "config": config,
                      "argv": ["--preset", preset, "--config", str(out / "configs" / f"{name}.yaml")]}
    evals = {"base": ["--preset", "digits", "--checkpoint", "digits-base", "--nfe", "1,2,4,100",
                      "--set", f"output_dir={out / 'eval' / 'base'}"]}
    for name in RUNS:
        evals[name] = ["--preset", "digits", "--checkpoint", str(out / "runs" / f"mini-{name}" / "final"),
                       "--nfe", "1,2,4,8" if name in RIVAL_RUNS + DMD_RUNS else "1,2,4",
                       "--set", f"output_dir={out / 'eval' / name}"]
    sweep = ["--preset", "digits-base-lam", "--set", f"storage_path={out / 'tune'}"]
    if quick:
        sweep += ["--set", "qwen.run.max_steps=150", "--set", "qwen.run.checkpoint_every=150",
                  "--set", "qwen.logging.ray_report_every=50"]
    return {"runs": runs, "evals": evals, "sweep": sweep}


def _eval_rows(out: Path, name: str) -> dict[int, dict]:
    res = json.loads((out / "eval" / name / "digits" / "results.json").read_text())
    rows = {}
    for nfe, r in res["nfe"].items():
        b = r["breakdown"]
        rows[int(nfe)] = {"accuracy": r.get("accuracy"), **{m: b.get(m) for m in METRICS if m != "accuracy"},
                          "coverage": f"{r['coverage']['scored']}/{r['coverage']['expected']}"}
    return rows


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def targets(table: dict) -> list[dict]:
    if "twinflow-lora" not in table:
        return []
    base100, base1, tf1 = table["base"][100], table["base"][1], table["twinflow-lora"][1]
    rc1 = table.get("rcgm-lora", {}).get(1, {"frechet": None})
    out = [
        {"target": "TwinFlow 1-NFE accuracy >= 0.98 x base 100-NFE", "value": _ratio(tf1["accuracy"], base100["accuracy"]),
         "bound": 0.98, "holds": (_ratio(tf1["accuracy"], base100["accuracy"]) or 0) >= 0.98},
        {"target": "TwinFlow 1-NFE Fréchet <= 1.3 x base 100-NFE", "value": _ratio(tf1["frechet"], base100["frechet"]),
         "bound": 1.3, "holds": (_ratio(tf1["frechet"], base100["frechet"]) or 9) <= 1.3},
        {"target": "TwinFlow 1-NFE recall >= 0.9 x base 100-NFE", "value": _ratio(tf1["recall"], base100["recall"]),
         "bound": 0.9, "holds": (_ratio(tf1["recall"], base100["recall"]) or 0) >= 0.9},
        {"target": "TwinFlow 1-NFE within-prompt diversity >= 0.9 x base 100-NFE",
         "value": _ratio(tf1["diversity_ratio"], base100["diversity_ratio"]), "bound": 0.9,
         "holds": (_ratio(tf1["diversity_ratio"], base100["diversity_ratio"]) or 0) >= 0.9},
        {"target": "base 1-NFE clearly worse than base 100-NFE (Fréchet ratio)", "value": _ratio(base1["frechet"],
                                                                                               base100["frechet"]),
         "bound": None, "holds": (_ratio(base1["frechet"], base100["frechet"]) or 0) > 1.5},
        {"target": "TwinFlow 1-NFE Fréchet < RCGM-only 1-NFE", "value": _ratio(tf1["frechet"], rc1["frechet"]),
         "bound": 1.0, "holds": (_ratio(tf1["frechet"], rc1["frechet"]) or 9) < 1.0},
    ]
    if "rcgm-lora" not in table:
        out = [c for c in out if "RCGM" not in c["target"]]
    ub1 = table.get("twinflow-unbiased-lora", {}).get(1)
    if ub1 is not None:
        value = _ratio(ub1["frechet"], tf1["frechet"])
        out.append({"target": "twinflow-unbiased 1-NFE Fréchet <= TwinFlow 1-NFE", "value": value, "bound": 1.0,
                    "holds": (value or 9) <= 1.0})
    for rival in RIVAL_RUNS:  # the paper: sCM / MeanFlow at 8 NFE below TwinFlow at 1 NFE
        r8 = table.get(rival, {}).get(8)
        if r8 is not None:
            value = _ratio(tf1["frechet"], r8["frechet"])
            out.append({"target": f"TwinFlow 1-NFE Fréchet < {rival} 8-NFE", "value": value, "bound": 1.0,
                        "holds": (value or 9) < 1.0})
    for rival in DMD_RUNS:  # the paper: DMD at 1 NFE collapses modes (lower recall / within-prompt diversity)
        r1 = table.get(rival, {}).get(1)
        if r1 is not None:
            for metric, label in (("recall", "recall"), ("diversity_ratio", "within-prompt diversity")):
                value = _ratio(r1[metric], tf1[metric])
                out.append({"target": f"{rival} 1-NFE {label} < TwinFlow 1-NFE", "value": value, "bound": 1.0,
                            "holds": value is not None and value < 1.0})
    return out


def write_markdown(out: Path, table: dict, curve: list[dict], checks: list[dict], seconds: dict) -> None:
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["# The paper in miniature: the digits base distilled to one step", "",
             "Digits benchmark (evals/digits): 20 prompts (10 classes × 2 caption templates) × 32 images per NFE; "
             "accuracy from an RBF SVM trained on real digits; Fréchet / precision / recall / within-prompt diversity "
             "(÷ the real digits') in a 32-d PCA space of the real digits.", "",
             "| model | NFE | accuracy | Fréchet ↓ | precision | recall | diversity ratio | scored |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in table.items():
        for nfe, r in sorted(rows.items()):
            lines.append(f"| {name} | {nfe} | " + " | ".join(fmt(r[m]) for m in METRICS) + f" | {r['coverage']} |")
    lines += ["", "## Targets", "", "| target | value | holds |", "|---|---|---|"]
    lines += [f"| {c['target']} | {fmt(c['value'])} | {'yes' if c['holds'] else '**no**'} |" for c in checks]
    if curve:
        lines += ["", "## λ curve (jobs/tune_lambda.py --preset digits-base-lam; 1-NFE digits probe, 16 images per "
                      "prompt)", "", "| λ | Fréchet ↓ | recall | diversity ratio | accuracy |", "|---|---|---|---|---|"]
        for row in sorted(curve, key=lambda r: float(r["lam"])):
            lines.append(f"| {float(row['lam']):.4f} | {fmt(row.get('digits_frechet_1nfe'))} | "
                         f"{fmt(row.get('digits_recall_1nfe'))} | {fmt(row.get('digits_diversity_ratio_1nfe'))} | "
                         f"{fmt(row.get('digits_accuracy_1nfe'))} |")
    lines += ["", "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def write_pictures(out: Path, table: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image, ImageDraw

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, rows in table.items():
        nfes = sorted(rows)
        for ax, m in zip(axes, ("frechet", "recall", "diversity_ratio")):
            ax.plot(nfes, [rows[n][m] for n in nfes], marker="o", label=name)
    for ax, m in zip(axes, ("Fréchet distance ↓", "recall ↑", "within-prompt diversity ÷ real ↑")):
        ax.set_xscale("log")
        ax.set_xlabel("NFE")
        ax.set_title(m)
    axes[0].set_yscale("log")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_nfe.png", dpi=110)
    plt.close(fig)
    grids = []
    for name in table:
        g = Image.open(out / "eval" / name / "digits" / "grid.png").convert("RGB")
        labelled = Image.new("RGB", (g.width, g.height + 16), "white")
        ImageDraw.Draw(labelled).text((4, 2), name, fill="black")
        labelled.paste(g, (0, 16))
        grids.append(labelled)
    canvas = Image.new("RGB", (max(g.width for g in grids), sum(g.height for g in grids)), "white")
    y = 0
    for g in grids:
        canvas.paste(g, (0, y))
        y += g.height
    canvas.save(out / "grid.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/mini-paper")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-sweep", action="store_true", help="skip the λ curve")
    p.add_argument("--runs", help=f"comma-separated subset of {','.join(RUNS)} (default: all); the base is always "
                                  "built and scored. Targets whose rows are missing are left out of the table")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    steps = plan(out, args.quick)
    if args.runs:
        chosen = [r.strip() for r in args.runs.split(",") if r.strip()]
        unknown = [r for r in chosen if r not in RUNS]
        if unknown:
            p.error(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join(RUNS)}")
        steps["runs"] = {k: v for k, v in steps["runs"].items() if k in chosen}
        steps["evals"] = {k: v for k, v in steps["evals"].items() if k == "base" or k in chosen}
    if args.dry_run:
        print(json.dumps(steps, indent=2))
        return 0
    from twinflow.mini.base import build_base
    from twinflow.ray_env import connect

    # Wall times of the invocation that did the work: a resumed stage (a finished run, cached images,
    # a restored sweep) keeps the time it took when it ran.
    previous = json.loads((out / "results.json").read_text()).get("seconds", {}) if (out / "results.json").is_file() else {}
    seconds: dict[str, float] = {}
    t0 = time.time()
    build_base()
    seconds["base"] = time.time() - t0
    connect()
    (out / "configs").mkdir(parents=True, exist_ok=True)
    train, evaluate, tune = _job("train_qwen"), _job("evaluate"), _job("tune_lambda")
    for name, run in steps["runs"].items():
        t = time.time()
        (out / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(run["config"], sort_keys=False))
        if not (out / "runs" / f"mini-{name}" / "final" / "config.yaml").is_file():
            code = train.main(run["argv"])
            if code != 0:
                raise SystemExit(f"run {name} failed (exit {code})")
        seconds[f"train {name}"] = time.time() - t
    table = {}
    for name, argv in steps["evals"].items():
        t = time.time()
        code = evaluate.main(argv)
        if code != 0:
            raise SystemExit(f"evaluation of {name} failed (exit {code})")
        table[name] = _eval_rows(out, name)
        seconds[f"eval {name}"] = time.time() - t
    curve: list[dict] = []
    if not args.no_sweep:
        t = time.time()
        tune.main(steps["sweep"])
        import csv

        with open(out / "tune" / "digits-base-lam" / "results" / "trials.csv") as f:
            curve = list(csv.DictReader(f))
        for row in curve:
            for k, v in row.items():
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    pass
        seconds["λ sweep"] = time.time() - t
    for key, old in previous.items():
        if key != "total" and old > seconds.get(key, 0.0):
            seconds[key] = old
    seconds["total"] = sum(v for k, v in seconds.items() if k != "total")
    checks = targets(table)
    (out / "results.json").write_text(json.dumps({"table": {k: {str(n): r for n, r in v.items()} for k, v in table.items()},
                                                  "targets": checks, "lambda_curve": curve, "seconds": seconds},
                                                 indent=1, default=str))
    write_markdown(out, table, curve, checks, seconds)
    write_pictures(out, table)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
