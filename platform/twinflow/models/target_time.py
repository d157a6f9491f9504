"""TwinFlow's target-time embedder E2 for any diffusers transformer (docs/METHOD.md §3.1).

Every backbone adds the same thing to its pretrained timestep embedding E1:

    temb = E1(t) + (t − r)·E2(r)

with E2 a copy of E1 (same class, weights copied at load), t and r the signed times in [−1, 1], so that
at r = t the model is exactly the pretrained one. diffusers' forward is never forked: a forward hook on
E1 adds the E2 term, and ``forward`` only takes one extra keyword, ``target_timestep``.

A family's transformer class mixes ``TargetTimeMixin`` into its diffusers class and says four things:

    E1_PATH          dotted path of E1 inside the transformer ("time_text_embed", "time_embed.emb")
    make_target_embedder()          a fresh module of E1's class and shape
    embed_target(e2, r, e1_args, e1_kwargs)   E2(r) called the way the model calls E1

``time_scale``: the value of ``timestep`` that means t = 1 (Qwen-Image embeds t ∈ [0, 1] itself, SANA is
fed t·1000), so that (t − r) is always in signed-time units whatever the model's timestep scale.
E2 has one attribute name in every family, ``time_text_embed_2`` (``E2_NAME``; Qwen-Image's E1 is
``time_text_embed``), so checkpoints, LoRA files and exports key it the same way whatever the backbone.
The flag ``target_time_embed`` is a registered config field of each class, so ``save_pretrained`` /
``from_pretrained`` round-trip E2; loading a plain checkpoint copy-initialises E2 from E1 and logs it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, ContextManager

import torch
from torch import nn

logger = logging.getLogger(__name__)

E2_NAME = "time_text_embed_2"
E2_PREFIX = E2_NAME + "."


def unmaterialised(module: nn.Module) -> bool:
    """True under meta init or a partitioning context (ZeRO-3 leaves ``ds_id`` on its params)."""
    return any(p.is_meta or hasattr(p, "ds_id") for p in module.parameters())


class TargetTimeMixin:
    """E2 on top of a diffusers transformer (see the module docstring). Call ``_init_target_time`` at the
    end of ``__init__``."""

    E1_PATH: str = ""
    E2_NAME = E2_NAME
    time_scale: float = 1.0

    # ---- what a family provides ------------------------------------------------------------------

    def make_target_embedder(self) -> nn.Module:
        raise NotImplementedError

    def embed_target(self, e2: nn.Module, r: torch.Tensor, e1_args: tuple, e1_kwargs: dict) -> torch.Tensor:
        raise NotImplementedError

    # ---- shared ----------------------------------------------------------------------------------

    def _init_target_time(self, enabled: bool) -> None:
        # Plain attributes (not submodules): the per-call times and an optional E2 stand-in (an EMA or
        # frozen copy used by LoRA teachers, see lora.py).
        self.__dict__["_twinflow_times"] = None
        self.__dict__["_e2_override"] = None
        if enabled:
            setattr(self, self.E2_NAME, self.make_target_embedder())
            if not unmaterialised(self.target_time_embedder):
                self.init_target_embedder_from_main()
        # A bound method, so deepcopy (EMA/frozen teachers) re-binds it to the copy.
        self.main_time_embedder.register_forward_hook(self._add_target_time_embedding, with_kwargs=True)

    @property
    def main_time_embedder(self) -> nn.Module:
        return self.get_submodule(self.E1_PATH)

    @property
    def target_time_embedder(self) -> nn.Module:
        return getattr(self, self.E2_NAME)

    @torch.no_grad()
    def init_target_embedder_from_main(self, gather_context: Callable[[list], ContextManager] | None = None) -> None:
        """E2 ← a copy of the pretrained E1 (docs/METHOD.md §3.1); materialises E2 if it is on meta."""
        e1, e2 = self.main_time_embedder, self.target_time_embedder
        ref = next(e1.parameters())
        if any(p.is_meta for p in e2.parameters()):
            e2.to_empty(device=ref.device)
        gather = gather_context or (lambda params: contextlib.nullcontext())
        with gather(list(e1.parameters()) + list(e2.parameters())):
            src = e1.state_dict()
            for name, p in e2.named_parameters():
                if name in src and src[name].numel() == p.numel():
                    p.copy_(src[name].to(p.dtype))

    @contextlib.contextmanager
    def target_embedder(self, module: nn.Module | None):
        """Use ``module`` in place of E2 inside the block (None: no change)."""
        previous = self._e2_override
        self.__dict__["_e2_override"] = module
        try:
            yield
        finally:
            self.__dict__["_e2_override"] = previous

    @property
    def output_layer(self) -> nn.Module:
        """The last projection (hidden state → patch velocities); its input, the last hidden state, is what
        DMD2's GAN head reads (method/dmd.py Discriminator)."""
        return self.proj_out

    def _run_with_target(self, t: Any, target_timestep: torch.Tensor | None, call: Callable[[], Any]) -> Any:
        """Run ``call`` (the diffusers forward) with the target time set for E1's hook."""
        if target_timestep is not None and not self.config.target_time_embed:
            raise ValueError("this transformer was built with target_time_embed=False; it cannot take a target "
                             "time r (rebuild it with target_time_embed=True)")
        self.__dict__["_twinflow_times"] = (t, target_timestep) if target_timestep is not None else None
        try:
            return call()
        finally:
            self.__dict__["_twinflow_times"] = None

    def _add_target_time_embedding(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        times = self._twinflow_times
        if times is None:
            return output
        t_raw, r_raw = times
        e2 = self._e2_override if self._e2_override is not None else self.target_time_embedder
        emb2, extra_rows = self.embed_target(e2, r_raw, args, kwargs)
        device = emb2.device
        # (t − r) in fp32 from the raw inputs, not from their low-precision casts, in signed-time units.
        scale = (t_raw.to(device=device, dtype=torch.float32) - r_raw.to(device=device, dtype=torch.float32))
        scale = scale / self.time_scale
        if extra_rows:  # rows the model appended to the batch (Qwen-Image's zero_cond_t): no E2 term there
            scale = torch.cat([scale, scale.new_zeros(extra_rows)])
        return output + (scale[:, None] * emb2.float()).to(output.dtype)

    @classmethod
    def _load_pretrained_model(cls, model, state_dict, resolved_model_file, pretrained_model_name_or_path,
                               loaded_keys, *args, **kwargs):
        """diffusers' loader, plus: a plain checkpoint has no E2 → copy it from E1."""
        prefix = E2_PREFIX
        e2_keys = [k for k in model.state_dict() if k.startswith(prefix)]
        missing_e2 = bool(e2_keys) and not any(k.startswith(prefix) for k in loaded_keys)
        if missing_e2:
            # Reported as loaded so diffusers does not warn "newly initialized"; filled in below.
            loaded_keys = list(loaded_keys) + e2_keys
        out = super()._load_pretrained_model(model, state_dict, resolved_model_file, pretrained_model_name_or_path,
                                             loaded_keys, *args, **kwargs)
        if missing_e2:
            out[0].init_target_embedder_from_main()
            logger.info("%s has no target-time embedder (%s): copy-initialised it from %s",
                        pretrained_model_name_or_path, cls.E2_NAME, cls.E1_PATH)
        return out
