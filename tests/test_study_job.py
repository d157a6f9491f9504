"""The small-scale study end to end through Ray Train: schema of results.json, tables, grids."""

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.ray

ALL_METHODS = ("fm", "rcgm", "twinflow", "meanflow", "scm", "dmd2", "vsd")


def test_tiny_study_through_ray_train_writes_the_documented_schema(ray_local, tmp_path):
    from twinflow.config.tree import build
    from twinflow.study.config import quick
    from twinflow.study.runner import run_study

    cfg = build(type(quick()), quick(), overrides=[
        f"out={tmp_path}", "digits.steps=40", "mixture2d.steps=40", "digits.log_every=20",
        "mixture2d.log_every=20", "eval.mixture_samples=1000", "eval.seeds=2",
        f"methods=[{', '.join(ALL_METHODS)}]", "digits.distill_steps=10", "mixture2d.distill_steps=10"])
    results = run_study(cfg, log=lambda *_: None)

    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk) >= {"digits", "mixture2d", "config"}
    assert on_disk["config"]["digits"]["steps"] == 40
    metrics = {"digits": ["frechet", "precision", "recall", "diversity", "accuracy"],
               "mixture2d": ["sliced_w2", "mode_coverage", "mode_balance"]}
    for ds, names in metrics.items():
        assert set(on_disk[ds]) == set(ALL_METHODS)  # the paper's rivals beside TwinFlow, same data and scoring
        for method, by_nfe in on_disk[ds].items():
            # one-step generators (DMD2, VSD) are scored at 1 NFE only (study/runner.py ONE_STEP_ONLY)
            assert set(by_nfe) == ({"nfe_1"} if method in ("dmd2", "vsd") else {"nfe_1", "nfe_2", "nfe_4", "nfe_8", "nfe_100"})
            for row in by_nfe.values():
                for m in names:
                    assert isinstance(row[m], float) and math.isfinite(row[m]), (ds, method, m)
    # two evaluation seeds really differ, so the std is a measurement, not a constant
    assert on_disk["mixture2d"]["twinflow"]["nfe_1"]["sliced_w2_std"] > 0
    # 40 steps of training leave plain flow matching at 1 NFE collapsed toward the mean
    assert on_disk["mixture2d"]["fm"]["nfe_1"]["off_mode"] > 0.5
    md = (tmp_path / "results.md").read_text()
    assert "## digits" in md and "## mixture2d" in md and "| twinflow | 1 |" in md and "real vs real" in md
    for ds in metrics:
        for method in ALL_METHODS:
            assert (tmp_path / f"samples_{ds}_{method}.png").stat().st_size > 1000
    assert results["timing"]["digits/twinflow"]["train_s"] > 0
    # ratios to flow matching at 100 NFE: the reference itself is 1, the floor-corrected one too
    ref = on_disk["ratios"]["mixture2d"]["fm"]["nfe_100"]
    assert ref["ratio"] == pytest.approx(1.0) and ref["floor_corrected"] == pytest.approx(1.0) and ref["floor"] > 0
    tf1 = on_disk["ratios"]["mixture2d"]["twinflow"]["nfe_1"]
    assert tf1["ratio"] == pytest.approx(on_disk["mixture2d"]["twinflow"]["nfe_1"]["sliced_w2"]
                                         / on_disk["mixture2d"]["fm"]["nfe_100"]["sliced_w2"])
    assert "relative to flow matching at 100 NFE" in md

    # parallel=runs (the default): each worker trained whole runs alone, so every run is exactly the
    # single-process run of its settings, and each came back under its own name
    import torch

    from twinflow.study.ray_job import load_dataset
    from twinflow.study.trainer import train_run

    torch.set_num_threads(1)  # as each of the 2 workers on this 2-core machine
    for ds, method in (("mixture2d", "twinflow"), ("digits", "fm"), ("mixture2d", "dmd2")):
        alone = train_run(load_dataset(ds), getattr(cfg.method, method), getattr(cfg, ds))
        assert results["timing"][f"{ds}/{method}"]["final_loss"] == pytest.approx(
            alone.history[-1]["loss/total"], rel=1e-5)


def test_lambda_sweep_writes_a_curve_over_lambda(ray_local, tmp_path):
    from twinflow.config.tree import build
    from twinflow.study.config import quick
    from twinflow.study.runner import run_study

    cfg = build(type(quick()), quick(), overrides=[
        f"out={tmp_path}", "datasets=[digits]", "sweep_lam=[0.0, 0.5]", "digits.steps=30", "digits.log_every=10",
        "eval.nfe=[1]", "parallel=data", "train_seeds=2"])  # every run DDP over both workers: the other wiring
    results = run_study(cfg, log=lambda *_: None)
    sweep = json.loads((tmp_path / "results.json").read_text())["lam_sweep"]["digits"]
    assert set(sweep) == {"0.0000", "0.5000"}
    assert sweep["0.0000"]["nfe_1"]["frechet"] != sweep["0.5000"]["nfe_1"]["frechet"]
    # two training seeds per λ: two different runs, their mean and spread
    cell = sweep["0.5000"]["nfe_1"]
    a, b = cell["frechet_per_seed"]
    assert cell["train_seeds"] == 2 and a != b
    assert cell["frechet"] == pytest.approx((a + b) / 2) and cell["frechet_train_std"] == pytest.approx(abs(a - b) / 2)
    assert set(results["timing"]) >= {"digits/twinflow_lam0.5000/seed0", "digits/twinflow_lam0.5000/seed1"}
    assert "digits" not in results  # the sweep replaces the method comparison
    md = (tmp_path / "results.md").read_text()
    assert "## λ sweep on digits" in md and "2 training seeds" in md
    assert (tmp_path / "lam_sweep.png").stat().st_size > 1000


def test_runs_are_dealt_longest_first_onto_the_least_loaded_worker():
    from twinflow.study.ray_job import deal_runs, run_cost

    def run(ds, method, steps):
        return {"dataset": ds, "method_name": method, "train": {"steps": steps}}

    runs = [run("digits", "fm", 8000), run("digits", "rcgm", 8000), run("digits", "twinflow", 8000),
            run("mixture2d", "fm", 10_000), run("mixture2d", "rcgm", 10_000), run("mixture2d", "twinflow", 10_000)]
    assert run_cost(runs[1]) == pytest.approx(1.6 * run_cost(runs[0]))
    deal = deal_runs(runs, 2)
    assert deal == [[0, 1, 3], [2, 4, 5]]
    loads = [sum(run_cost(runs[i]) for i in d) for d in deal]
    assert max(loads) / min(loads) < 1.1 and sorted(i for d in deal for i in d) == list(range(6))
    assert deal_runs(runs, 1) == [list(range(6))] and deal_runs(runs[:1], 3) == [[0], [], []]


def test_bad_cli_values_fail_before_ray_with_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/small_scale_study.py"), "--quick", "--datasets", "cifar"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "config error: datasets: unknown dataset 'cifar'; choose from digits, mixture2d")


def test_dry_run_prints_the_resolved_config():
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/small_scale_study.py"), "--quick", "--lam", "0.25",
                           "--dry-run"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "lam: 0.25" in proc.stdout and "steps: 800" in proc.stdout


def test_ablation_cells_differ_from_twinflow_by_their_edit_only():
    """--ablation: every variant is the study's TwinFlow cell with one change, beside FM, each training seed."""
    from twinflow.config.tree import to_dict
    from twinflow.study.ablation import ABLATIONS
    from twinflow.study.runner import study_runs

    main = importlib.import_module("small_scale_study")
    cfg = main.resolve_config(main.StudyConfig, main.parse_args(["--quick", "--train-seeds", "2", "--ablation"]),
                              main.PRESETS, main.SHORTCUTS, preset="quick")
    assert cfg.methods == ["fm"] and cfg.ablation == list(ABLATIONS) and cfg.out == "runs/study-ablation-quick"
    runs = study_runs(cfg)
    assert len(runs) == 2 * (1 + len(ABLATIONS)) * 2
    by_name = {(r["dataset"], r["method_name"], r["train_seed"]): r for r in runs}
    base = by_name[("mixture2d", "twinflow-default", 1)]
    assert to_dict(base["method"]) == to_dict(cfg.method.twinflow) and base["train"].seed == cfg.mixture2d.seed + 1

    def changed(name):
        run = by_name[("mixture2d", f"twinflow-{name}", 1)]
        flat = {**_flat(to_dict(run["method"]), "method"), **_flat(to_dict(run["train"]), "train")}
        ref = {**_flat(to_dict(base["method"]), "method"), **_flat(to_dict(base["train"]), "train")}
        return {k for k in flat if flat[k] != ref[k]}

    assert changed("l2_near_diag") == {"method.block_loss.near_diag.loss", "method.block_loss.near_diag.clip"}
    assert changed("real_velocity") == {"method.real_velocity_weight"}
    assert changed("constant_lr") == {"train.lr_schedule"}
    assert changed("lam_half") == {"method.lam"}
    assert changed("l2_near_diag_real_velocity") == {"method.block_loss.near_diag.loss",
                                                      "method.block_loss.near_diag.clip", "method.real_velocity_weight"}
    assert cfg.method.twinflow.real_velocity_weight == 0  # the edits never leak into the shared cell


def test_the_unbiased_preset_and_its_override_dict_are_one_rule():
    """twinflow_unbiased() and the ``twinflow:`` overrides the mini paper's run writes give the same config."""
    from twinflow.config.tree import from_dict, merge_into, to_dict
    from twinflow.method import TwinFlowConfig, twinflow, twinflow_unbiased
    from twinflow.method.config import UNBIASED

    via_dict = from_dict(TwinFlowConfig, merge_into(TwinFlowConfig, to_dict(twinflow()), UNBIASED))
    assert to_dict(via_dict) == to_dict(twinflow_unbiased()) != to_dict(twinflow())
    cfg = twinflow_unbiased()
    assert (cfg.block_loss.near_diag.loss, cfg.block_loss.near_diag.clip, cfg.real_velocity_weight) == ("l2", False, 1.0)
    assert cfg.loss == "barron" and cfg.block_loss.any_step.clip  # every other block keeps the released recipe


def _flat(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}") if isinstance(v, dict) else {f"{prefix}.{k}": v})
    return out


def test_a_gan_head_under_ddp_is_refused_in_the_config():
    """DDP averages the fake network's gradients, not those of DMD2's GAN head beside it."""
    from twinflow.config.errors import ConfigError
    from twinflow.config.tree import build
    from twinflow.study.config import quick

    sets = ["methods=[fm, dmd2]", "method.dmd2.gan_weight=0.005"]
    build(type(quick()), quick(), overrides=sets).validate()  # parallel: runs (the default) trains it
    with pytest.raises(ConfigError, match=r"^method.dmd2.gan_weight: the GAN head trains outside DDP"):
        build(type(quick()), quick(), overrides=sets + ["parallel=data"]).validate()
