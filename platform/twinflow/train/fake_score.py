"""DMD2 / VSD in a DeepSpeed run: the fake and real scores the Ray Train worker builds beside the engine.

The engine (train/engine.py) trains the student exactly as it trains TwinFlow. What DMD adds lives here:
  LoRA mode  one base. The student is the engine's "default" adapter; the fake score is a "fake" adapter
             added *after* ``deepspeed.initialize`` (so ZeRO-2 never flattens or hooks it), a copy of the
             student's (base output at the start); the real score is the base with every adapter off.
  full mode  the paper's three copies: the fake score is a trained copy of the starting model, the real
             score a frozen one, both loaded from the model folder like the student (identical on all ranks).
With ZeRO-2 the fake score trains with its own torch AdamW (lr = optim.lr × fake_lr_scale, constant;
optim's betas, eps and weight decay; clipped at deepspeed.gradient_clipping), outside DeepSpeed: its
gradients are averaged over the ranks by one all-reduce of a flat buffer, so every rank applies the same
update and the fake score stays identical everywhere (a checkpoint needs rank 0's copy only).
With ZeRO-3 (full mode; the copies are what ZeRO-3 is for: at 20B they do not fit whole on a GPU) each copy
is partitioned like the student, as its own DeepSpeed engine — the fake score a trained one (same optimizer
settings at the fake learning rate, one optimizer step per fake update, DeepSpeed's clipping and
non-finite skip), the real score one without an optimizer (ZeRO-3 inference) — the way RLHF trainers hold
their reference and critic models. Its checkpoint is DeepSpeed's, in fake_score/ beside the student's.

``fake_updates`` fake steps run per *micro-batch*, so with gradient accumulation the two-time-scale ratio is
fake_updates × deepspeed.gradient_accumulation fake steps per student step.

With ``gan_weight`` > 0 DMD2's GAN head (method/dmd.py ``Discriminator``, on the fake network's last
hidden state) is one more set of fake parameters: same optimizer, same all-reduce, same checkpoint
(names ``gan_head.*``).

Checkpoints: ``state_dict()`` (the fake weights and its AdamW state; under ZeRO-3 only the skip count)
goes into twinflow/fake_score.* of every checkpoint (train/state.py); in LoRA mode DeepSpeed would not save
it (the adapter is frozen outside its training block, and LoRA checkpoints exclude frozen weights).
``save_files`` / ``load_files`` write and read the ZeRO-3 engine's own shards (every rank; no-ops otherwise).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import nn

from twinflow.method.dmd import DMDConfig, DMDObjective, Discriminator
from twinflow.train.config import TrainConfig


class FakeScore:
    """The fake score of one rank: its parameters, optimizer, and the objective built around them."""

    def __init__(self, cfg: TrainConfig, velocity: nn.Module, model_path: str, world: int):
        from twinflow.models.lora import (FAKE_ADAPTER, AdapterVelocity, add_fake_adapter, fake_adapter_parameters,
                                          fake_adapter_training, is_lora)

        method: DMDConfig = cfg.objective_config
        self.world = world
        self.fake_engine = None
        transformer = velocity.transformer
        if cfg.deepspeed.zero_stage == 3:  # full mode (config.py refuses LoRA and the GAN head here)
            self._build_zero3(cfg, model_path, method)
            return
        if is_lora(transformer):
            add_fake_adapter(transformer)
            named = fake_adapter_parameters(transformer)
            fake, fake_eval = velocity, AdapterVelocity(velocity, transformer, FAKE_ADAPTER)
            real = AdapterVelocity(velocity, transformer, None)
            context = partial(fake_adapter_training, transformer)
        else:
            from twinflow.models.loading import build_velocity_model

            mcfg = dataclasses.replace(cfg.model, path=model_path)
            fake = build_velocity_model(mcfg).to(next(velocity.parameters()).device)
            real = build_velocity_model(mcfg).to(fake.transformer.device).requires_grad_(False).eval()
            named = {n: p for n, p in fake.named_parameters() if p.requires_grad}
            fake_eval, context = fake, None
            self.fake_module, self.real_module = fake, real
        self.discriminator = None
        if method.gan_weight > 0:  # DMD2's GAN head: trained beside the fake score, saved with it
            self.discriminator = Discriminator(fake)
            named.update({f"gan_head.{n}": p for n, p in self.discriminator.named_parameters()})
        self.names, self.params = list(named), list(named.values())
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr * method.fake_lr_scale, betas=tuple(o.betas),
                                           eps=o.eps, weight_decay=o.weight_decay)
        clip = cfg.deepspeed.gradient_clipping or None
        self.objective = DMDObjective(method, real=real, fake=fake, fake_opt=self.optimizer, fake_params=self.params,
                                      grad_clip=clip, fake_context=context, fake_eval=fake_eval,
                                      reduce_grads=self.average_grads if world > 1 else None,
                                      discriminator=self.discriminator)

    def _build_zero3(self, cfg: TrainConfig, model_path: str, method: DMDConfig) -> None:
        import deepspeed

        from twinflow.train.ds_config import fake_score_deepspeed_config, frozen_deepspeed_config
        from twinflow.train.engine import load_velocity

        ds_fake = fake_score_deepspeed_config(cfg)
        fake = load_velocity(cfg, model_path, ds_fake)
        params = [p for p in fake.parameters() if p.requires_grad]
        o = cfg.optim
        optimizer = (torch.optim.AdamW(params, lr=o.lr * method.fake_lr_scale, betas=tuple(o.betas), eps=o.eps,
                                       weight_decay=o.weight_decay) if cfg.deepspeed.optimizer == "torch" else None)
        self.fake_engine, _, _, _ = deepspeed.initialize(model=fake, model_parameters=params, optimizer=optimizer,
                                                         config=ds_fake)
        ds_real = frozen_deepspeed_config(cfg)
        real = load_velocity(cfg, model_path, ds_real).requires_grad_(False).eval()
        self.real_engine, _, _, _ = deepspeed.initialize(model=real, config=ds_real)
        self.fake_module, self.real_module = self.fake_engine.module, self.real_engine.module
        self.discriminator, self.names, self.params, self.optimizer = None, [], params, None
        self.objective = DMDObjective(method, real=self.real_engine, fake=self.fake_engine, fake_opt=None,
                                      fake_params=params, fake_update=self._engine_update)

    def _engine_update(self, loss: torch.Tensor) -> bool:
        """The ZeRO-3 fake step: DeepSpeed's backward (reduce-scatter of the partitioned gradients) and step
        (clip, AdamW); False when DeepSpeed skipped it for a non-finite gradient (bf16.check_grad_overflow)."""
        skipped = self.fake_engine.skipped_steps
        self.fake_engine.backward(loss)
        self.fake_engine.step()
        return self.fake_engine.skipped_steps == skipped

    def average_grads(self, params: list[nn.Parameter]) -> None:
        """Mean of every rank's gradient, in place (one all-reduce; a missing gradient counts as zero)."""
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        if self.fake_engine is not None:  # the weights and optimizer are in the engine's own files
            return {"skipped": self.objective.fake_skipped}
        opt = self.optimizer.state_dict()
        return {"weights": {n: p.detach().cpu().clone() for n, p in zip(self.names, self.params)},
                "optimizer": {"state": {str(k): v for k, v in opt["state"].items()},
                              "param_groups": opt["param_groups"]},
                "skipped": self.objective.fake_skipped}

    def load_state_dict(self, state: dict) -> None:
        self.objective.fake_skipped = int(state.get("skipped", 0))
        if self.fake_engine is not None:
            return
        weights = state["weights"]
        missing = [n for n in self.names if n not in weights]
        if missing:
            raise KeyError(f"the checkpoint's fake score lacks {len(missing)} weights, e.g. {missing[0]}")
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(weights[n].to(p.device, p.dtype))
        opt = state["optimizer"]
        # JSON turned the state's integer keys into strings; torch matches them to param_groups' ints.
        self.optimizer.load_state_dict({"state": {int(k): v for k, v in opt["state"].items()},
                                        "param_groups": opt["param_groups"]})

    def save_files(self, root, tag: str) -> None:
        """Every rank: the ZeRO-3 fake engine's shards (module + optimizer) under <root>/fake_score/."""
        if self.fake_engine is not None:
            from pathlib import Path

            from twinflow.train.state import FAKE_SCORE_DIR

            self.fake_engine.save_checkpoint(str(Path(root) / FAKE_SCORE_DIR), tag=tag)

    def load_files(self, root, tag: str) -> None:
        """Every rank: restore what ``save_files`` wrote (weights-only reads; CheckpointError names the file)."""
        if self.fake_engine is not None:
            from pathlib import Path

            from twinflow.train.state import FAKE_SCORE_DIR, load_deepspeed_checkpoint

            load_deepspeed_checkpoint(self.fake_engine, Path(root) / FAKE_SCORE_DIR, tag,
                                      load_optimizer_states=True, load_lr_scheduler_states=False)
