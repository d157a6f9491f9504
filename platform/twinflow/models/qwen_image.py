"""Qwen-Image as TwinFlow's velocity network F(x_t, t, r, cond) (docs/METHOD.md §2, §3.1).

Two pieces:

``TwinFlowQwenImageTransformer2DModel``
    diffusers' ``QwenImageTransformer2DModel`` plus a second timestep embedder
    ``time_text_embed_2`` (E2) for the target time r, so that

        temb = E1(t) + (t − r)·E2(r)        (per sample; the post-2026-01-07 rule)

    E1 is the pretrained ``time_text_embed`` fed the raw signed t ∈ [−1, 1] (its sinusoid scales
    by 1000, exactly as the Qwen pipeline feeds σ ∈ [0, 1]); E2 is copy-initialised from E1.
    diffusers' forward is not forked: a forward hook on ``time_text_embed`` adds the E2 term, and
    ``forward`` only takes one extra keyword, ``target_timestep``. Called without it (as the stock
    ``QwenImagePipeline`` does) r = t and the model is the pretrained one. The flag
    ``target_time_embed`` is a registered config field, so ``save_pretrained``/``from_pretrained``
    round-trip E2; loading a plain Qwen-Image checkpoint copy-initialises E2 from E1 and logs it.

The rest of the Qwen-Image family lives beside it:
  qwen_velocity.py  ``QwenImageVelocity``, the method's F over this model (latent packing, img_shapes)
  qwen_loading.py   building (random weights from a config) and loading (diffusers' from_pretrained,
                    or module-by-module streaming into a ZeRO-3 partitioned model), ready to train
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, ContextManager

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.configuration_utils import register_to_config
# Imported for diffusers' component loader, not used here: a pipeline folder names this module as
# the transformer's library, and diffusers finds the load method by looking up ``ModelMixin``
# *in that module* (pipeline_loading_utils.get_class_obj_and_candidates).
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.models.transformers.transformer_qwenimage import QwenTimestepProjEmbeddings
from torch import nn

logger = logging.getLogger(__name__)

E2_PREFIX = "time_text_embed_2."

# The released Qwen/Qwen-Image transformer (transformer/config.json on the hub; the same numbers
# are diffusers' constructor defaults): 60 dual-stream blocks, 24 heads × 128 = 3072 wide, text
# from Qwen2.5-VL-7B (3584), 16-channel VAE latents packed 2×2 (64 in), RoPE axes 16/56/56.
QWEN_IMAGE_20B_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}


class TwinFlowQwenImageTransformer2DModel(QwenImageTransformer2DModel):
    """Qwen-Image transformer with TwinFlow's target-time embedder E2 (see the module docstring)."""

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 64,
        out_channels: int | None = 16,
        num_layers: int = 60,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 3584,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        zero_cond_t: bool = False,
        use_additional_t_cond: bool = False,
        use_layer3d_rope: bool = False,
        target_time_embed: bool = True,
    ):
        super().__init__(patch_size=patch_size, in_channels=in_channels, out_channels=out_channels,
                         num_layers=num_layers, attention_head_dim=attention_head_dim,
                         num_attention_heads=num_attention_heads, joint_attention_dim=joint_attention_dim,
                         guidance_embeds=guidance_embeds, axes_dims_rope=axes_dims_rope, zero_cond_t=zero_cond_t,
                         use_additional_t_cond=use_additional_t_cond, use_layer3d_rope=use_layer3d_rope)
        # Plain attributes (not submodules): the per-call target time and an optional E2 stand-in
        # (an EMA or frozen copy used by LoRA teachers, see lora.py).
        self.__dict__["_twinflow_times"] = None
        self.__dict__["_e2_override"] = None
        if target_time_embed:
            # E2 never gets the Layered model's additional-t embedding: it embeds r only.
            self.time_text_embed_2 = QwenTimestepProjEmbeddings(embedding_dim=self.inner_dim)
            if not _unmaterialised(self.time_text_embed_2):
                self.init_target_embedder_from_main()
        # A bound method, so deepcopy (EMA/frozen teachers) re-binds it to the copy.
        self.time_text_embed.register_forward_hook(self._add_target_time_embedding)

    # ---- E2 ---------------------------------------------------------------------------------

    @torch.no_grad()
    def init_target_embedder_from_main(self, gather_context: Callable[[list], ContextManager] | None = None) -> None:
        """E2 ← a copy of the pretrained E1 (docs/METHOD.md §3.1); materialises E2 if it is on meta."""
        e1, e2 = self.time_text_embed, self.time_text_embed_2
        ref = e1.timestep_embedder.linear_1.weight
        if any(p.is_meta for p in e2.parameters()):
            e2.to_empty(device=ref.device)
        gather = gather_context or (lambda params: contextlib.nullcontext())
        with gather(list(e1.parameters()) + list(e2.parameters())):
            src = {k: v for k, v in e1.state_dict().items() if k.startswith(("timestep_embedder.",))}
            for name, p in e2.named_parameters():
                if name in src and src[name].numel() == p.numel():
                    p.copy_(src[name].to(p.dtype))

    @contextlib.contextmanager
    def target_embedder(self, module: nn.Module | None):
        """Use ``module`` in place of ``time_text_embed_2`` inside the block (None: no change)."""
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

    def forward(self, *args, target_timestep: torch.Tensor | None = None, **kwargs):
        """diffusers' forward plus ``target_timestep`` r [B] (None: r = t, the pretrained model)."""
        t = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        if target_timestep is not None and not self.config.target_time_embed:
            raise ValueError("this transformer was built with target_time_embed=False; it cannot take a target "
                             "time r (rebuild it with target_time_embed=True)")
        self.__dict__["_twinflow_times"] = (t, target_timestep) if target_timestep is not None else None
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.__dict__["_twinflow_times"] = None

    def _add_target_time_embedding(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        times = self._twinflow_times
        if times is None:
            return output
        t_raw, r_raw = times
        t_cast, hidden_states = args[0], args[1]
        n = r_raw.shape[0]
        r = r_raw.to(device=t_cast.device, dtype=t_cast.dtype)  # embedded exactly as E1 embeds t
        # (t − r) in fp32 from the raw inputs, not from their bf16 casts.
        scale = t_raw.to(device=t_cast.device, dtype=torch.float32) - r_raw.to(device=t_cast.device,
                                                                                dtype=torch.float32)
        if t_cast.shape[0] == 2 * n:  # zero_cond_t (edit models) doubles the batch with t = 0 rows
            r = torch.cat([r, t_cast[n:]])
            scale = torch.cat([scale, scale.new_zeros(n)])
        e2 = self._e2_override if self._e2_override is not None else self.time_text_embed_2
        e2_dtype = e2.timestep_embedder.linear_1.weight.dtype
        # E2 may be kept in fp32 next to a bf16 base (LoRA mode); it only reads the dtype hint.
        emb2 = e2(r, hidden_states[:0].to(e2_dtype))
        return output + (scale[:, None] * emb2.float()).to(output.dtype)

    # ---- loading ------------------------------------------------------------------------------

    @classmethod
    def _load_pretrained_model(cls, model, state_dict, resolved_model_file, pretrained_model_name_or_path,
                               loaded_keys, *args, **kwargs):
        """diffusers' loader, plus: a plain Qwen-Image checkpoint has no E2 → copy it from E1."""
        e2_keys = [k for k in model.state_dict() if k.startswith(E2_PREFIX)]
        missing_e2 = bool(e2_keys) and not any(k.startswith(E2_PREFIX) for k in loaded_keys)
        if missing_e2:
            # Reported as loaded so diffusers does not warn "newly initialized"; filled in below.
            loaded_keys = list(loaded_keys) + e2_keys
        out = super()._load_pretrained_model(model, state_dict, resolved_model_file, pretrained_model_name_or_path,
                                             loaded_keys, *args, **kwargs)
        if missing_e2:
            out[0].init_target_embedder_from_main()
            logger.info("%s has no target-time embedder (time_text_embed_2): copy-initialised it from "
                        "time_text_embed", pretrained_model_name_or_path)
        return out


def _unmaterialised(module: nn.Module) -> bool:
    """True under meta init or a partitioning context (ZeRO-3 leaves ``ds_id`` on its params)."""
    return any(p.is_meta or hasattr(p, "ds_id") for p in module.parameters())
