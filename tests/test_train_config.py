"""jobs/train_qwen.py before Ray starts: config errors, --dry-run, the batch plan, the LR schedule,
the re-submission check, and the bound that keeps ZeRO-3 ranks in step. No Ray, no DeepSpeed."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from twinflow.config.errors import ConfigError
from twinflow.config.tree import build
from twinflow.method.blocks import BatchLayout, Block, allocate_micro_batch, block_counts
from twinflow.method.config import TwinFlowConfig
from twinflow.train.config import TrainConfig
from twinflow.train.presets import PRESETS, qwen_image_full_zero3, qwen_image_lora, tiny

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "train_qwen.py"


def run_job(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # were Ray started by mistake, it would fail loudly
    return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


# ---------------------------------------------------------------------------
# config errors: one line, exit code 2, before Ray
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    (["--set", "deepspeed.micro_batch_per_gpu=1", "--set", "deepspeed.gradient_accumulation=1"],
     "config error: deepspeed.micro_batch_per_gpu: global batch 2 is too small"),
    (["--set", "deepspeed.zero_stag=3"], "config error: deepspeed.zero_stag: unknown field; did you mean 'zero_stage'?"),
    (["--set", "deepspeed.zero_stage=4"], "config error: deepspeed.zero_stage: must be 2 or 3, got 4"),
    (["--set", "deepspeed.zero_stage=3"], "config error: twinflow.teacher: ema teachers need whole weights"),
])
def test_config_errors_are_one_line_before_ray(args, expected):
    proc = run_job(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(expected), lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_dry_run_of_the_20b_yamls_needs_no_weights():
    proc = run_job("--config", "jobs/configs/qwen_image_full_zero3.yaml", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "path: Qwen/Qwen-Image" in out and "mode: full" in out
    assert "global batch 32 = 2 per GPU × 16 workers × 1 accumulation steps" in out
    assert "λ realised 0.3125 (requested 0.3333)" in out
    assert '"stage": 3' in out and '"stage3_gather_16bit_weights_on_model_save": true' in out
    assert '"memory_plan": {' in out and "memory plan (per GPU):" in out

    proc = run_job("--config", "jobs/configs/qwen_image_lora.yaml", "--dry-run", "--set",
                   "deepspeed.gradient_accumulation=2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "rank: 64" in out and "source: s3://your-bucket/qwen-image/latents-512" in out
    assert "global batch 64 = 4 per GPU × 8 workers × 2 accumulation steps" in out
    # one row per (rank, accumulation step), for steps 0 and 1
    assert out.count("\n     7     1  ") == 2
    assert '"stage": 2' in out and '"bf16": {\n      "enabled": true' in out


def test_yamls_are_full_serialisations_of_their_presets():
    # --config merges over the tiny default: every field must be set by the file itself.
    assert build(TrainConfig, tiny(), ROOT / "jobs/configs/qwen_image_lora.yaml") == qwen_image_lora()
    assert build(TrainConfig, tiny(), ROOT / "jobs/configs/qwen_image_full_zero3.yaml") == qwen_image_full_zero3()


def test_cross_section_rules():
    def check(base, **sections):
        cfg = dataclasses.replace(base, **{k: dataclasses.replace(getattr(base, k), **v) for k, v in sections.items()})
        build(TrainConfig, cfg)

    check(tiny())  # the default is valid
    check(tiny(), scaling={"num_workers": 1})  # one worker: fault-injection ranks only matter when set
    with pytest.raises(ConfigError, match=r"^debug\.exit_rank: must be < scaling\.num_workers \(1\)"):
        check(tiny(), scaling={"num_workers": 1}, debug={"exit_at_step": 2, "fault_marker_dir": "/tmp/x"})
    with pytest.raises(ConfigError, match=r"^model\.ema: twinflow\.teacher: ema on a LoRA model"):
        check(tiny(), model={"ema": False})
    with pytest.raises(ConfigError, match=r"^deepspeed\.offload_optimizer: .*deepspeed\.optimizer: deepspeed"):
        check(tiny(), deepspeed={"offload_optimizer": True})
    with pytest.raises(ConfigError, match=r"^deepspeed\.offload_params: parameter offload needs zero_stage: 3"):
        check(tiny(), deepspeed={"offload_params": True})
    with pytest.raises(ConfigError, match=r"^model\.dtype: full-parameter training in fp32"):
        check(tiny(), model={"mode": "full", "ema": False, "dtype": "bfloat16"}, twinflow={"teacher": "self"})
    with pytest.raises(ConfigError, match=r"^scaling\.resources_per_worker: asks for GPUs"):
        check(tiny(), scaling={"resources_per_worker": {"GPU": 1}})
    with pytest.raises(ConfigError, match=r"^debug\.fault_marker_dir"):
        check(tiny(), debug={"exit_at_step": 3})
    with pytest.raises(ConfigError, match=r"^run\.name: use letters"):
        check(tiny(), run={"name": "a/b"})
    assert sorted(PRESETS) == ["digits", "digits-full", "qwen-image-full-zero3", "qwen-image-lora", "tiny"]


def test_dmd_methods_read_their_own_sections_and_take_zero3_in_full_mode_only():
    """method: dmd2 / vsd pick the section of that name (VSD's weighting and one fake step by default);
    ZeRO-3 is taken in full mode (the copies get engines of their own) and refused in LoRA mode and with the
    GAN head; a section renamed to the other method is a one-line error naming the field."""
    def resolved(*sets):
        return build(TrainConfig, tiny(), overrides=list(sets))

    cfg = resolved("method=vsd")
    assert (cfg.objective_config.weighting, cfg.objective_config.fake_updates) == ("vsd", 1)
    cfg = resolved("method=dmd2", "dmd2.fake_updates=3")
    assert (cfg.objective_config.weighting, cfg.objective_config.fake_updates) == ("dmd", 3)
    zero3 = ("deepspeed.zero_stage=3", "twinflow.teacher=self", "model.ema=false")
    with pytest.raises(ConfigError, match=r"^deepspeed\.zero_stage: method dmd2 in LoRA mode trains its fake adapter"):
        resolved("method=dmd2", *zero3)
    full = resolved("method=dmd2", *zero3, "model.mode=full", "model.dtype=float32")
    assert (full.deepspeed.zero_stage, full.model.mode) == (3, "full")
    with pytest.raises(ConfigError, match=r"^dmd2\.gan_weight: the GAN head trains beside the fake score"):
        resolved("method=dmd2", *zero3, "model.mode=full", "model.dtype=float32", "dmd2.gan_weight=0.1")
    with pytest.raises(ConfigError, match=r"^vsd\.name: the vsd section trains vsd"):
        resolved("method=vsd", "vsd.name=dmd2")
    with pytest.raises(ConfigError, match=r"^dmd2\.fake_updates: must be >= 1"):
        resolved("method=dmd2", "dmd2.fake_updates=0")


# ---------------------------------------------------------------------------
# batch plan and LR schedule
# ---------------------------------------------------------------------------


def test_batch_plan_deals_exactly_the_global_block_counts():
    from twinflow.train.plan import batch_plan

    cfg = qwen_image_lora()
    cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, micro_batch_per_gpu=1,
                                                                 gradient_accumulation=3))
    plan = batch_plan(cfg, steps=(0, 1, 2, 5))
    counts = block_counts(cfg.twinflow.weights(), 24)
    assert plan["global_batch"] == 24 and list(plan["block_counts"].values()) == counts
    for rows in plan["micro_batches"].values():
        assert len(rows) == 8 * 3
        assert all(sum(r[n] for n in ("one_step", "near_diag", "any_step", "fake")) == 1 for r in rows)
        for i, name in enumerate(("one_step", "near_diag", "any_step", "fake")):
            assert sum(r[name] for r in rows) == counts[i]
    assert plan["lam_realised"] == pytest.approx((counts[0] + counts[3]) / 24)


def test_lr_schedule_warmup_then_cosine_to_the_floor():
    from twinflow.train.config import OptimConfig
    from twinflow.train.ds_config import LrSchedule

    s = LrSchedule(OptimConfig(schedule="cosine", warmup_steps=4, min_lr_ratio=0.1), max_steps=14)
    assert [round(s(i), 6) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]  # full lr on the last warm-up step
    assert s(4) == pytest.approx(1.0) and s(9) == pytest.approx(0.55) and s(14) == pytest.approx(0.1)
    assert s(100) == pytest.approx(0.1)
    c = LrSchedule(OptimConfig(schedule="constant"), max_steps=10)
    assert {c(i) for i in range(20)} == {1.0}


# ---------------------------------------------------------------------------
# re-submission
# ---------------------------------------------------------------------------


def test_resubmission_with_another_model_or_sharding_is_refused(tmp_path):
    from twinflow.train.prepare import check_resubmission
    from twinflow.train.storage import RunStorage

    cfg = tiny()
    storage = RunStorage.for_run(str(tmp_path), "run-a")
    assert check_resubmission(storage, cfg) is False  # first submission: recorded
    assert (tmp_path / "run-a" / "config.yaml").is_file()
    longer = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, max_steps=500),
                                 logging=dataclasses.replace(cfg.logging, tensorboard=False))
    assert check_resubmission(storage, longer) is True  # schedule and logging may change
    other = dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, num_workers=4))
    with pytest.raises(ConfigError, match=r"^run\.name: .*run-a already holds a run and scaling\.num_workers was 2, "
                                          r"now 4"):
        check_resubmission(storage, other)
    lam = dataclasses.replace(cfg, twinflow=dataclasses.replace(cfg.twinflow, lam=0.5))
    with pytest.raises(ConfigError, match=r"twinflow\.lam was 0\.333"):
        check_resubmission(storage, lam)


def test_a_run_recorded_with_spelled_out_family_defaults_resumes_under_the_new_defaults(tmp_path):
    """Runs recorded before model.family and "empty LoRA targets = the family's" existed name Qwen-Image's
    targets and no family; resubmitted with today's defaults they are the same model, another target set is not."""
    import yaml

    from twinflow.models.lora import QWEN_IMAGE_LORA_TARGETS
    from twinflow.train.prepare import check_resubmission
    from twinflow.train.storage import RunStorage

    cfg = tiny()
    storage = RunStorage.for_run(str(tmp_path), "old-run")
    check_resubmission(storage, cfg)
    record = tmp_path / "old-run" / "config.yaml"
    old = yaml.safe_load(record.read_text())
    del old["model"]["family"]
    old["model"]["lora"]["targets"] = list(QWEN_IMAGE_LORA_TARGETS)
    record.write_text(yaml.safe_dump(old))
    assert cfg.model.family == "auto" and cfg.model.lora.targets == []
    assert check_resubmission(storage, cfg) is True
    fewer = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, lora=dataclasses.replace(cfg.model.lora, targets=["to_q", "to_k"])))
    with pytest.raises(ConfigError, match=r"model\.lora\.targets"):
        check_resubmission(storage, fewer)


# ---------------------------------------------------------------------------
# ZeRO-3: the network-pass bound
# ---------------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x, t, r, cond):
        self.calls += 1
        return self.lin(x) * (1 + t[:, None] - r[:, None])


@pytest.mark.parametrize("tf", [TwinFlowConfig(), TwinFlowConfig(rcgm_order=1, enhance_ratio=0.0),
                                TwinFlowConfig(lam=0.0), TwinFlowConfig(rectify_coef=0.0)])
def test_objective_never_exceeds_the_zero3_pass_bound_and_reaches_it(tf):
    from twinflow.method.objective import TwinFlowObjective
    from twinflow.train.engine import max_network_calls

    bound = max_network_calls(tf)
    net = _Net()
    objective = TwinFlowObjective(tf)
    gen = torch.Generator().manual_seed(0)
    layout = BatchLayout(micro_batch=2, world_size=4, accum_steps=1)
    counts = []
    for step in range(12):
        for rank in range(4):
            ids = allocate_micro_batch(tf.weights(), layout, rank, 0, step)
            net.calls = 0
            objective(net, torch.randn(2, 8), torch.zeros(2), ids, uncond=torch.ones(2), generator=gen)
            counts.append(net.calls)
    assert max(counts) <= bound
    active = [b for b, w in zip(Block, tf.weights().as_list()) if w > 0]
    full = torch.tensor(active * (16 // len(active)))
    net.calls = 0
    objective(net, torch.randn(len(full), 8), torch.zeros(len(full)), full, uncond=torch.ones(len(full)), generator=gen)
    assert net.calls == bound  # every active block present: the bound is exact, not loose
    assert min(counts) < bound  # ranks really do differ without padding


def test_a_resubmission_that_raises_max_steps_decays_over_the_new_horizon():
    """DeepSpeed restores the LambdaLR's state (the step count *and* the schedule object's attributes);
    reset_lr_schedule keeps the step and puts this submission's horizon in, and the current LR with it."""
    import types

    from twinflow.train.ds_config import LrSchedule, lr_scheduler_factory
    from twinflow.train.engine import reset_lr_schedule

    def submission(max_steps: int):
        cfg = tiny()
        return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, max_steps=max_steps),
                                   optim=dataclasses.replace(cfg.optim, lr=1e-3, schedule="cosine", warmup_steps=2,
                                                             min_lr_ratio=0.1))

    first = submission(10)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=first.optim.lr)
    sched = lr_scheduler_factory(first)(opt)
    for _ in range(6):  # six optimizer steps, then the checkpoint
        opt.step()
        sched.step()
    saved = sched.state_dict()

    again = submission(30)
    opt2 = torch.optim.AdamW([param], lr=again.optim.lr)
    sched2 = lr_scheduler_factory(again)(opt2)
    sched2.load_state_dict(saved)  # what DeepSpeed's load_checkpoint does
    assert sched2.lr_lambdas[0].max_steps == 10  # the restored object still decays over the old horizon
    reset_lr_schedule(types.SimpleNamespace(lr_scheduler=sched2), again)
    new_curve = LrSchedule(again.optim, 30)
    assert sched2.last_epoch == 6 and sched2.lr_lambdas[0].max_steps == 30
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * new_curve(6), rel=1e-12)
    assert new_curve(6) > LrSchedule(first.optim, 10)(6) + 0.1  # the two horizons differ here, visibly
    for step in range(7, 12):  # and it continues on the new curve
        opt2.step()
        sched2.step()
        assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * new_curve(step), rel=1e-12)
