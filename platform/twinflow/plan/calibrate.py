"""Run a planned configuration for real and compare the measured peak with the plan.

``build_rig(inputs, device)`` builds what ``plan_memory(inputs)`` describes for one process (the
transformer from ``inputs`` 's architecture with random weights, LoRA or full, gradient
checkpointing, AdamW over the trained parameters, one micro-batch of random latents and prompt
embeddings, an uncond embedding, and the block ids of the plan's worst-case micro-batch), so that
``measure_against_plan`` can run warm-up steps and then one measured step of the real
``TwinFlowObjective``. Used by tests/test_plan_calibration.py (CPU), jobs/bench_train.py and
jobs/gpu_check.py (CUDA).

Measured = static tensors (weights, buffers, optimizer state, the batch; counted exactly) + the
peak above them during one step (``measure.PeakMemory``). Planned = ``MemoryPlan.allocated_peak``
(the CUDA context is not part of either). Only single-process runs can be measured here:
ZeRO/offload lines are checked by the formulas' unit tests instead.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
from torch import nn

from twinflow.method.config import TwinFlowConfig
from twinflow.method.objective import TwinFlowObjective
from twinflow.plan.measure import CountingVelocity, StepResult, objective_step, tensor_bytes
from twinflow.plan.memory import MemoryPlan, plan_memory
from twinflow.plan.inputs import PlanInputs, resolve_architecture


@dataclass
class Rig:
    transformer: nn.Module
    velocity: CountingVelocity
    optimizer: torch.optim.Optimizer
    latents: torch.Tensor
    cond: dict
    uncond: dict
    block_ids: torch.Tensor | None
    """Rows' blocks for ``method`` (the planned config's worst case); other methods get their own."""
    generator: torch.Generator
    method: TwinFlowConfig | None = None

    def static_bytes(self) -> int:
        counted = tensor_bytes(self.transformer, self.optimizer, grads=False)
        batch = sum(t.numel() * t.element_size() for t in (self.latents, *self.cond.values(), *self.uncond.values()))
        return counted["params"] + counted["buffers"] + counted["optimizer"] + batch

    def block_ids_for(self, method: TwinFlowConfig) -> torch.Tensor:
        """``block_ids`` if given for this rig, else the method's own worst-case composition of B rows
        (fm() puts every row in the near-diagonal block)."""
        if self.block_ids is not None and method is self.method:
            return self.block_ids
        from twinflow.plan.forwards import worst_case_schedule

        counts = worst_case_schedule(method, int(self.latents.shape[0])).counts
        return torch.repeat_interleave(torch.arange(4), torch.tensor(counts)).to(self.latents.device)

    def step(self, method: TwinFlowConfig, measure: bool = False) -> StepResult:
        objective = TwinFlowObjective(method)
        return objective_step(self.velocity, objective, self.optimizer, self.latents, self.cond,
                              self.block_ids_for(method),
                              uncond=self.uncond if method.enhance_ratio > 0 else None, generator=self.generator,
                              measure=measure)


def build_rig(inputs: PlanInputs, device: str | torch.device = "cpu", seed: int = 0,
              block_counts: list[int] | None = None, init_context: ContextManager | None = None) -> Rig:
    """The single-process training set-up ``inputs`` describes (see the module docstring).

    ``block_counts``: rows per block (one-step, near, any, fake); default: the plan's worst case.
    ``init_context``: where the weights are created (e.g. ``torch.device("cuda")``); default: ``device``.
    """
    from twinflow.models.lora import add_lora
    from twinflow.models.loading import build_twinflow_transformer
    from twinflow.models.qwen_velocity import QwenImageVelocity
    from twinflow.plan.forwards import worst_case_schedule

    device = torch.device(device)
    arch = resolve_architecture(inputs)
    torch.manual_seed(seed)
    ctx = init_context if init_context is not None else (torch.device(device) if device.type != "cpu"
                                                         else contextlib.nullcontext())
    transformer = build_twinflow_transformer(arch, torch_dtype=inputs.model.torch_dtype, init_context=ctx)
    if inputs.model.mode == "lora":
        with ctx:
            add_lora(transformer, inputs.model.lora)
    else:
        transformer.requires_grad_(True)
    if inputs.model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    velocity = CountingVelocity(QwenImageVelocity(transformer))
    trained = [p for p in transformer.parameters() if p.requires_grad]
    # foreach=True everywhere: CUDA's default, whose one fp32 temporary per state the plan counts.
    optimizer = torch.optim.AdamW(trained, lr=1e-5, betas=(0.9, 0.99), weight_decay=0.0, foreach=True)
    counts = block_counts or worst_case_schedule(inputs.twinflow, inputs.micro_batch, inputs.num_gpus,
                                                 inputs.grad_accum).counts
    b = int(sum(counts))
    g = torch.Generator(device=device).manual_seed(seed)
    c, h, w = inputs.latent_shape
    text_dim = int(arch["joint_attention_dim"])
    latents = torch.randn(b, c, h, w, generator=g, device=device)
    cond = {"prompt_embeds": torch.randn(b, inputs.text_tokens, text_dim, generator=g, device=device),
            "prompt_mask": torch.ones(b, inputs.text_tokens, dtype=torch.long, device=device)}
    uncond = {"prompt_embeds": torch.randn(1, inputs.text_tokens, text_dim, generator=g, device=device).expand(b, -1, -1),
              "prompt_mask": torch.ones(b, inputs.text_tokens, dtype=torch.long, device=device)}
    block_ids = torch.repeat_interleave(torch.arange(4), torch.tensor(counts)).to(device)
    return Rig(transformer=transformer, velocity=velocity, optimizer=optimizer, latents=latents, cond=cond,
               uncond=uncond, block_ids=block_ids, generator=g, method=inputs.twinflow)


def measure_against_plan(inputs: PlanInputs, device: str | torch.device = "cpu", warmup: int = 1,
                         rig: Rig | None = None, plan: MemoryPlan | None = None) -> dict[str, Any]:
    """Warm-up steps (they create the optimizer state), then one measured step; plan vs measured."""
    plan = plan or plan_memory(inputs)
    rig = rig or build_rig(inputs, device)
    for _ in range(warmup):
        rig.step(inputs.twinflow)
    static = rig.static_bytes()
    result = rig.step(inputs.twinflow, measure=True)
    measured = static + int(result.peak_bytes or 0)
    planned = plan.allocated_peak
    return {"measured_bytes": measured, "measured_static_bytes": static, "measured_step_peak_bytes": result.peak_bytes,
            "planned_bytes": int(planned), "planned_static_bytes": int(plan.static_bytes),
            "planned_peak_phase": plan.peak_phase, "planned_over_measured": planned / measured if measured else None,
            "measured_phases_bytes": {k: v[0] for k, v in result.phases.items()},
            "planned_phases_bytes": {k: int(v) for k, v in plan.phases.items()},
            "forwards_measured": result.forwards,
            "forwards_planned_max": plan.schedule.b_equivalents(False)}


def measure_block_saved(inputs: PlanInputs, block: int = 1) -> dict[str, float]:
    """Bytes autograd saves inside transformer block ``block`` during one grad forward (no
    checkpointing), per image token and per text token, counted with ``saved_tensors_hooks``
    (unique storages, parameters excluded). Two forwards with different token counts separate
    the image and text streams' shares."""
    from twinflow.models.lora import add_lora
    from twinflow.models.loading import build_twinflow_transformer
    from twinflow.models.qwen_velocity import QwenImageVelocity

    arch = resolve_architecture(inputs)
    if int(arch["num_layers"]) <= block:
        raise ValueError(f"the architecture has {arch['num_layers']} blocks; cannot measure block {block}")
    torch.manual_seed(0)
    transformer = build_twinflow_transformer(arch, torch_dtype=inputs.model.torch_dtype)
    if inputs.model.mode == "lora":
        add_lora(transformer, inputs.model.lora)
    else:
        transformer.requires_grad_(True)
    params = {p.untyped_storage().data_ptr() for p in transformer.parameters()}
    target = transformer.transformer_blocks[block]
    velocity = QwenImageVelocity(transformer)
    text_dim = int(arch["joint_attention_dim"])
    c = inputs.latent_channels

    def saved_bytes(side: int, txt: int) -> int:
        saved: dict[int, int] = {}
        inside = [False]

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if inside[0] and st.data_ptr() not in params:
                saved[st.data_ptr()] = st.nbytes()
            return t

        hooks = [target.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)),
                 target.register_forward_hook(lambda *a: inside.__setitem__(0, False))]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                x = torch.randn(1, c, side, side)
                cond = {"prompt_embeds": torch.randn(1, txt, text_dim),
                        "prompt_mask": torch.ones(1, txt, dtype=torch.long)}
                t = torch.rand(1)
                velocity(x, t, t * 0.5, cond)
        finally:
            for h in hooks:
                h.remove()
        return sum(saved.values())

    side = max(4, inputs.height // 8)
    a = saved_bytes(side, inputs.text_tokens)
    b = saved_bytes(2 * side, inputs.text_tokens)            # 4× the image tokens, same text
    d = saved_bytes(side, 2 * inputs.text_tokens)            # twice the text tokens
    img_tokens = (side // 2) ** 2
    per_img = (b - a) / (3 * img_tokens)
    per_txt = (d - a) / inputs.text_tokens
    return {"per_image_token": per_img, "per_text_token": per_txt,
            "constant": a - per_img * img_tokens - per_txt * inputs.text_tokens}
