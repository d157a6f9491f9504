"""The planner against measurements on this CPU.

1. Activation bytes per token per block (activations.py's table) against what autograd really
   saves in one block (``saved_tensors_hooks``), for full and LoRA training.
2. Whole training steps of the real TwinFlowObjective (build_rig: random-weight Qwen-Image from a
   config, LoRA, gradient checkpointing, AdamW): planned allocator peak vs measured peak (static
   tensors + the step's high-water mark from the CPU allocator's events), within 15 %.
3. The forward calls the objective really makes, counted by wrapping F, against the plan's schedule.
"""

from __future__ import annotations

import pytest
import torch

from twinflow.method.config import twinflow
from twinflow.models.config import ModelConfig
from twinflow.models.lora import LoraSettings
from twinflow.plan import PlanInputs, plan_memory
from twinflow.plan.activations import ActivationModel, BlockShape, lora_sites
from twinflow.plan.calibrate import build_rig, measure_against_plan, measure_block_saved
from twinflow.plan.presets import tiny

ARCH = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2, "attention_head_dim": 128,
        "num_attention_heads": 2, "joint_attention_dim": 256, "guidance_embeds": False, "axes_dims_rope": [16, 56, 56]}


@pytest.fixture(autouse=True)
def one_thread():
    # The machine is shared: oversubscribed OpenMP threads slow everything down, measurements too.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def inputs(mode="lora", dtype="bfloat16", targets=None, gc=True, side=256, txt=32) -> PlanInputs:
    lora = LoraSettings(rank=8) if targets is None else LoraSettings(rank=8, targets=targets)
    return PlanInputs(model=ModelConfig(path="from-config", family="qwen-image", mode=mode, dtype=dtype, lora=lora,
                                                 gradient_checkpointing=gc),
                      architecture=dict(ARCH), twinflow=twinflow(), num_gpus=1, zero_stage=0, micro_batch=6,
                      height=side, width=side, text_tokens=txt)


@pytest.mark.parametrize("mode,targets", [("full", None), ("lora", None), ("lora", ["to_q", "to_k", "img_mlp.net.2"])])
def test_block_saved_bytes_match_autograd(mode, targets):
    inp = inputs(mode=mode, targets=targets, side=128, txt=16)
    measured = measure_block_saved(inp)
    act = ActivationModel(BlockShape.from_architecture(ARCH), mode=mode, act_bytes=2, lora_bytes=4, lora_rank=8,
                          wrapped=lora_sites(ARCH, inp.model.lora_targets()) if mode == "lora" else frozenset(),
                          gradient_checkpointing=False)
    rope = 4 * ARCH["attention_head_dim"]  # the image RoPE table, shared by all blocks (counted outside)
    assert measured["per_image_token"] - rope == pytest.approx(act.block_saved_per_token(0), rel=0.03)
    assert measured["per_text_token"] == pytest.approx(act.block_saved_per_token(1), rel=0.03)


def test_tiny_step_peak_within_15_percent():
    result = measure_against_plan(tiny())
    assert 0.85 <= result["planned_over_measured"] <= 1.15, result


def test_small_lora_step_peak_and_forward_calls():
    inp = inputs()  # bf16 base, fp32 LoRA r8 on the 14 targets, GC on, 256² → 256 + 32 tokens, B = 6
    plan = plan_memory(inp)
    rig = build_rig(inp)
    result = measure_against_plan(inp, rig=rig, plan=plan)
    assert 0.85 <= result["planned_over_measured"] <= 1.15, result
    # The objective's calls: 1 grad forward of all B rows; no-grad rows between the deterministic
    # part (fake 1 + CFG 2·4 + rectification 2·1 + rollouts of the one-step row 2·1) and the bound.
    rows = rig.velocity.calls
    assert [n for n, g in rows if g] == [6]
    nograd = sum(n for n, g in rows if not g)
    assert 1 + 8 + 2 + 2 <= nograd <= plan.schedule.b_equivalents(False)["nograd_forwards"] * 6
    assert len(rows) == len(plan.schedule.calls)
