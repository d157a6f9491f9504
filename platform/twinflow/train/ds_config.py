"""Our config → a DeepSpeed config dict, and the LR schedule DeepSpeed steps for us.

DeepSpeed owns gradient accumulation (``engine.backward``/``engine.step`` per micro-batch; the
optimizer steps at the boundary), clipping, ZeRO partitioning and checkpoint shards. What it is
told comes only from here, so ``--dry-run`` can print exactly the dict the workers will use.

Choices that are not DeepSpeed defaults, and why:
  zero_allow_untested_optimizer   a client torch.optim.AdamW under ZeRO (no fused-op JIT build)
  bf16.check_grad_overflow        a non-finite gradient skips the step on every rank (NaN handling)
  stage3_gather_16bit_weights_on_model_save   ZeRO-3 export gathers whole weights on rank 0
  steps_per_print 1e9             our tracker logs; DeepSpeed's own prints would flood job logs
"""

from __future__ import annotations

from typing import Any

from twinflow.config.tree import deep_merge
from twinflow.method.lr_schedule import cosine_factor, warmup_factor
from twinflow.train.config import OptimConfig, TrainConfig


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage, "overlap_comm": cfg.scaling.use_gpu,
                            "contiguous_gradients": True}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
        if ds.param_persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = int(ds.param_persistence_threshold)
            zero["model_persistence_threshold"] = int(ds.param_persistence_threshold)
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": ds.micro_batch_per_gpu,
        "gradient_accumulation_steps": ds.gradient_accumulation,
        "train_batch_size": cfg.layout.global_batch,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.optimizer == "deepspeed":
        o = cfg.optim
        out["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                        "weight_decay": o.weight_decay}}
    return deep_merge(out, ds.extra)


def fake_score_deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """DMD2 / VSD under ZeRO-3: the fake score's own engine. The student's settings, but one optimizer
    step per fake update (no accumulation: each update is one micro-batch of student samples) at the
    fake learning rate (optim.lr × fake_lr_scale, constant: no scheduler is given to this engine)."""
    out = deepspeed_config(cfg)
    out["gradient_accumulation_steps"] = 1
    out["train_batch_size"] = cfg.deepspeed.micro_batch_per_gpu * cfg.scaling.num_workers
    if "optimizer" in out:
        out["optimizer"]["params"]["lr"] = cfg.optim.lr * cfg.objective_config.fake_lr_scale
    return out


def frozen_deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """A frozen copy under ZeRO-3 (DMD's real score): partitioned like the student, no optimizer."""
    out = fake_score_deepspeed_config(cfg)
    out.pop("optimizer", None)
    return out


class LrSchedule:
    """Multiplier of optim.lr per optimizer step: linear warm-up (lr/w ... lr over the first w steps),
    then constant or cosine to the floor (method/lr_schedule.py).

    A plain object, not a closure: ``LambdaLR.state_dict`` (in every DeepSpeed checkpoint) saves its
    attributes, and on resume ``reset_lr_schedule`` (engine.py) swaps in this submission's settings,
    so the restored step count continues on the curve the new config describes.
    """

    def __init__(self, optim: OptimConfig, max_steps: int):
        self.schedule = optim.schedule
        self.warmup = int(optim.warmup_steps)
        self.floor = float(optim.min_lr_ratio)
        self.max_steps = int(max_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return warmup_factor(step, self.warmup)
        if self.schedule == "constant":
            return 1.0
        return cosine_factor((step - self.warmup) / max(1, self.max_steps - self.warmup), self.floor)


def lr_scheduler_factory(cfg: TrainConfig):
    """What ``deepspeed.initialize(lr_scheduler=...)`` takes: optimizer -> LambdaLR."""
    schedule = LrSchedule(cfg.optim, cfg.run.max_steps)

    def make(optimizer):
        from torch.optim.lr_scheduler import LambdaLR

        return LambdaLR(optimizer, schedule)

    return make
