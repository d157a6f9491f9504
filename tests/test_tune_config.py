"""tune/config.py, search.py, resources.py, results.py: the sweep's config, search specs, concurrency
and best-config files, without Ray (the sweep through Tune + Train is in test_tune_sweep.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from twinflow.config.errors import ConfigError
from twinflow.config.tree import to_dict
from twinflow.tune.config import PRESETS, SweepConfig, build_sweep
from twinflow.tune.resources import max_concurrent, per_trial_need
from twinflow.tune.search import grid_size, parse_search_arg, parse_spec

ROOT = Path(__file__).resolve().parents[1]
YAMLS = {"digits": "tune_digits.yaml", "qwen-tiny": "tune_qwen_tiny.yaml", "qwen-lora-proxy": "tune_qwen_lora_proxy.yaml"}


def test_specs_parse_to_values_and_bad_specs_name_the_field():
    assert parse_spec("grid:0.1667,0.3333,0.5").values == (0.1667, 0.3333, 0.5)
    assert parse_spec("choice:ema,self").values == ("ema", "self")
    assert parse_spec("loguniform:1e-4,1e-2").values == (1e-4, 1e-2)  # "1e-4" is a string in YAML 1.1
    assert parse_spec("randint:1,4").candidates() == [1, 2, 3, 3]
    lo_hi = parse_spec("uniform:0,1").candidates(points=5)
    assert lo_hi == [0.0, 0.25, 0.5, 0.75, 1.0]
    key, spec = parse_search_arg("twinflow.rectify_coef=choice:0.25,0.5")
    assert key == "twinflow.rectify_coef" and spec.kind == "choice"
    assert grid_size({"a": parse_spec("grid:1,2,3"), "b": parse_spec("grid:x,y"), "c": parse_spec("uniform:0,1")}) == 6
    for text, expected in [("0.3", "has no kind"), ("normal:0,1", "unknown kind 'normal'"),
                           ("uniform:1,0", "needs LO < HI"), ("loguniform:0,1", "LO > 0"),
                           ("grid:1,,2", "empty value"), ("uniform:0,1,2", "two numbers"),
                           ("randint:0.5,3", "integers")]:
        with pytest.raises(ConfigError, match=expected):
            parse_spec(text, "search.lam")
    with pytest.raises(ConfigError, match="FIELD=KIND:VALUES"):
        parse_search_arg("lam")


def test_search_shorthands_resolve_per_target_and_every_candidate_is_validated():
    cfg = build_sweep(PRESETS["digits"](), searches=["lam=grid:0.25,0.5", "twinflow.rectify_coef=choice:0.5,1.0"])
    assert cfg.search_paths() == {"twinflow.lam": "grid:0.25,0.5", "train.lr": "loguniform:3e-4,3e-3",
                                  "twinflow.rectify_coef": "choice:0.5,1.0"}
    qwen = build_sweep(PRESETS["qwen-tiny"]())
    assert set(qwen.search_paths()) == {"twinflow.lam", "optim.lr"} and qwen.metric == "nfe_gap_mse"
    # a range that reaches an invalid value is refused before Ray starts, naming the field
    with pytest.raises(ConfigError, match=r"twinflow.lam=1.05: digits.twinflow.lam: must be in \[0, 1\]"):
        build_sweep(PRESETS["digits"](), searches=["lam=uniform:0,1.5"])
    with pytest.raises(ConfigError, match="digits.foo: unknown field"):
        build_sweep(PRESETS["digits"](), searches=["foo.bar=grid:1"])
    with pytest.raises(ConfigError, match="run.name is set by the sweep"):
        build_sweep(PRESETS["qwen-tiny"](), searches=["run.name=grid:a,b"])


def test_asha_rungs_must_fall_on_reports_and_the_metric_must_exist():
    with pytest.raises(ConfigError, match="asha.grace_period: 150 is not a multiple of the report interval 100"):
        build_sweep(PRESETS["digits"](), overrides=["asha.grace_period=150"])
    with pytest.raises(ConfigError, match="asha.max_t: 900 is beyond the trials' horizon of 600"):
        build_sweep(PRESETS["digits"](), overrides=["asha.max_t=900"])
    with pytest.raises(ConfigError, match="tune.metric: digits trials report"):
        build_sweep(PRESETS["digits"](), overrides=["tune.metric=fid"])
    with pytest.raises(ConfigError, match="qwen.probe.kind"):
        build_sweep(PRESETS["qwen-tiny"](), overrides=["qwen.probe.kind=none"])
    # the loss is a legal (if poor) stopping metric once named with its mode
    cfg = build_sweep(PRESETS["digits"](), overrides=["tune.metric=loss/total", "tune.mode=min"])
    assert (cfg.metric, cfg.mode) == ("loss/total", "min")


def test_max_concurrent_trials_is_the_scarcest_resource():
    need = per_trial_need(8, {"CPU": 4, "twinflow_train": 1}, use_gpu=True)
    assert need == {"CPU": 32.0, "twinflow_train": 8.0, "GPU": 8.0}
    assert max_concurrent(need, {"CPU": 192, "GPU": 16, "twinflow_train": 16}) == 2
    assert max_concurrent(need, {"CPU": 40, "GPU": 24, "twinflow_train": 24}) == 1  # CPU-bound
    assert max_concurrent(per_trial_need(1, {"CPU": 1}, use_gpu=False), {"CPU": 4.0, "GPU": 0.0}) == 4
    assert per_trial_need(1, {"CPU": 0.5}, use_gpu=False, reserve_cpus=1.0) == {"CPU": 1.5}
    with pytest.raises(ConfigError, match="tune.capacity: one trial needs GPU=8 but the cluster has 0"):
        max_concurrent(need, {"CPU": 64})


@pytest.mark.parametrize("preset", sorted(YAMLS))
def test_shipped_yamls_are_their_presets(preset):
    from_yaml = build_sweep(SweepConfig(), str(ROOT / "jobs" / "configs" / YAMLS[preset]))
    assert to_dict(from_yaml) == to_dict(PRESETS[preset]())


def _job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "tune_lambda.py"), *args], capture_output=True,
                          text=True, timeout=120)


def test_command_line_dry_run_and_one_line_errors():
    dry = _job("--dry-run", "--search", "twinflow.rectify_coef=grid:0.5,1.0", "--set", "tune.num_samples=1")
    assert dry.returncode == 0, dry.stderr
    assert '"trials": 6' in dry.stdout and '"max_concurrent_trials": "derived at start"' in dry.stdout
    bad = _job("--set", "asha.reduction_factor=1")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["config error: asha.reduction_factor: must be >= 2"]


def test_best_configs_from_a_digits_winner_run_as_they_are(tmp_path):
    """The winner's λ and lr land in a train_qwen YAML (with ``promote``) that the job accepts, and in
    a study YAML; the table marks the winner; trials stopped early never win."""
    from twinflow.tune.results import COMPLETED, STOPPED, pick_winner, write_results

    cfg = build_sweep(PRESETS["digits"](), overrides=["promote=[run.max_steps=77]"])
    rows = [{"trial": "a", "twinflow.lam": 0.1667, "train.lr": 1e-3, "lam": 0.1667, "lr": 1e-3, "step": 600,
             "reports": 6, "frechet_1nfe": 0.30, "status": COMPLETED, "error": ""},
            {"trial": "b", "twinflow.lam": 0.3333, "train.lr": 2e-3, "lam": 0.3333, "lr": 2e-3, "step": 600,
             "reports": 6, "frechet_1nfe": 0.25, "status": COMPLETED, "error": ""},
            {"trial": "c", "twinflow.lam": 0.5, "train.lr": 1e-3, "lam": 0.5, "lr": 1e-3, "step": 100,
             "reports": 1, "frechet_1nfe": 0.10, "status": STOPPED, "error": ""}]
    winner = pick_winner(rows, cfg)
    assert winner["trial"] == "b"
    files = write_results(rows, winner, cfg, str(tmp_path))
    assert "| b | 0.3333 | 0.002 |" in (tmp_path / "trials.md").read_text()
    assert (tmp_path / "trials.md").read_text().count("**(best)**") == 1
    assert (tmp_path / "metric_vs_lambda.png").stat().st_size > 1000
    text = Path(files["train_qwen"]).read_text()
    assert "lam: 0.3333" in text and "lr: 0.002" in text and "max_steps: 77" in text
    dry = subprocess.run([sys.executable, str(ROOT / "jobs" / "train_qwen.py"), "--config", files["train_qwen"],
                          "--dry-run"], capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    assert "λ realised" in dry.stdout
    study = subprocess.run([sys.executable, str(ROOT / "jobs" / "small_scale_study.py"), "--config", files["study"],
                            "--dry-run"], capture_output=True, text=True, timeout=120)
    assert study.returncode == 0, study.stderr
    assert "lam: 0.3333" in study.stdout
