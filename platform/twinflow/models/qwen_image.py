"""Qwen-Image as TwinFlow's velocity network F(x_t, t, r, cond) (METHOD.md §1, §2.1).

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

``QwenImageVelocity``
    an ``nn.Module`` that is the method's F: normalised VAE latents [B, C, H, W] in, average
    velocity [B, C, H, W] out. It packs 2×2 patches and builds ``img_shapes`` with the pipeline's
    own static helpers, and passes the prompt mask the way the pipeline does (None when full).

Building for 20B: ``load_twinflow_transformer`` goes through diffusers' ``from_pretrained`` (meta
init, then weights streamed in on CPU) or, with ``init_context`` (e.g. ``deepspeed.zero.Init``),
builds the module inside that context and streams the safetensors shards in module by module
through ``gather_context`` (e.g. ``GatheredParameters(params, modifier_rank=0)``).
``build_twinflow_transformer(config)`` makes random weights from a config (``QWEN_IMAGE_20B_CONFIG``
is the real model's) for memory checks.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable

import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
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
        """E2 ← a copy of the pretrained E1 (METHOD.md §2.1); materialises E2 if it is on meta."""
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


# ---------------------------------------------------------------------------
# building and loading
# ---------------------------------------------------------------------------


def build_twinflow_transformer(config: dict[str, Any] | None = None, torch_dtype: torch.dtype | None = None,
                               init_context: ContextManager | None = None) -> TwinFlowQwenImageTransformer2DModel:
    """Random-weight TwinFlow transformer from a config dict (default: the real 20B one).

    ``init_context`` decides where the weights live: ``accelerate.init_empty_weights()`` (meta,
    no memory), ``deepspeed.zero.Init(...)`` (partitioned), or None (CPU, fully allocated).
    E2 is copy-initialised from E1 when the weights are materialised.
    """
    cfg = dict(QWEN_IMAGE_20B_CONFIG if config is None else config)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    with _default_dtype(torch_dtype), (init_context or contextlib.nullcontext()):
        model = TwinFlowQwenImageTransformer2DModel.from_config(cfg)
    return model


def load_twinflow_transformer(path_or_hub_id: str | Path, subfolder: str | None = "transformer",
                              torch_dtype: torch.dtype | None = None, lora: Any = None, ema_adapter: bool = False,
                              gradient_checkpointing: bool = False, init_context: ContextManager | None = None,
                              gather_context: Callable[[list], ContextManager] | None = None,
                              full_trainable: bool = False,
                              **from_pretrained_kwargs) -> TwinFlowQwenImageTransformer2DModel:
    """Load a Qwen-Image (or TwinFlow) transformer the way diffusers does, ready to train.

    path_or_hub_id   a local pipeline folder or hub id (``Qwen/Qwen-Image``); ``subfolder`` picks the
                     transformer (None when the path *is* the transformer folder).
    torch_dtype      weights dtype (bf16 for 20B); LoRA params and E2 follow ``lora.dtype``.
    lora             a ``LoraSettings`` (lora.py): adds the "default" adapter, freezes the base,
                     leaves E2 fully trainable. None: full-parameter model.
    ema_adapter      LoRA only: also add the "ema" adapter for the LoRA-EMA teacher.
    full_trainable   full mode: set requires_grad on every parameter (off: leave as loaded).
    init_context     build the module inside this context (``deepspeed.zero.Init``, or
                     ``accelerate.init_empty_weights()``) and stream the weights in; None: diffusers'
                     ``from_pretrained`` (meta init, then CPU weights).
    gather_context   with ``init_context``: ``params -> context manager`` that makes those params whole
                     while they are written (``lambda ps: deepspeed.zero.GatheredParameters(ps,
                     modifier_rank=0)``); default: nothing to gather.
    """
    if init_context is None:
        model = TwinFlowQwenImageTransformer2DModel.from_pretrained(
            path_or_hub_id, subfolder=subfolder, dtype=torch_dtype, **from_pretrained_kwargs)
    else:
        config = TwinFlowQwenImageTransformer2DModel.load_config(path_or_hub_id, subfolder=subfolder,
                                                                 **_hub_kwargs(from_pretrained_kwargs))
        model = build_twinflow_transformer(config, torch_dtype=torch_dtype, init_context=init_context)
        folder = _resolve_folder(path_or_hub_id, subfolder, from_pretrained_kwargs)
        load_weights_into(model, folder, gather_context=gather_context)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if lora is not None:
        from twinflow.models.lora import add_ema_adapter, add_lora

        add_lora(model, lora)
        if ema_adapter:
            add_ema_adapter(model)
    elif full_trainable:
        model.requires_grad_(True)
    return model


def build_velocity_model(cfg, init_context: ContextManager | None = None,
                         gather_context: Callable[[list], ContextManager] | None = None,
                         **from_pretrained_kwargs) -> "QwenImageVelocity":
    """``QwenImageModelConfig`` (models/config.py) -> a trainable ``QwenImageVelocity``.

    Full mode: every parameter trainable. LoRA mode: base frozen, "default" adapter + E2
    trainable, plus the frozen "ema" adapter when ``cfg.ema``.
    """
    cfg.validate()
    transformer = load_twinflow_transformer(
        cfg.path, subfolder=cfg.subfolder or None, torch_dtype=cfg.torch_dtype,
        lora=cfg.lora if cfg.mode == "lora" else None, ema_adapter=cfg.ema and cfg.mode == "lora",
        gradient_checkpointing=cfg.gradient_checkpointing, init_context=init_context,
        gather_context=gather_context, full_trainable=cfg.mode == "full", **from_pretrained_kwargs)
    transformer.train()
    return QwenImageVelocity(transformer)


def load_weights_into(model: TwinFlowQwenImageTransformer2DModel, folder: str | Path,
                      gather_context: Callable[[list], ContextManager] | None = None) -> list[str]:
    """Stream a diffusers safetensors checkpoint (single or sharded) into ``model``, module by module.

    Works for materialised, meta (the tensors are assigned) and partitioned (``gather_context``)
    parameters. A missing E2 is copy-initialised from E1. Returns the checkpoint keys the model
    does not have (ignored). Raises ``KeyError`` for model weights absent from the checkpoint.
    """
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        single = folder / "diffusion_pytorch_model.safetensors"
        if not single.exists():
            raise FileNotFoundError(f"no diffusers safetensors checkpoint in {folder} (expected "
                                    f"{single.name} or {index.name})")
        with safe_open(single, framework="pt") as f:
            weight_map = {k: single.name for k in f.keys()}
    gather = gather_context or (lambda params: contextlib.nullcontext())
    expected = dict(model.named_parameters())
    expected.update(dict(model.named_buffers()))
    missing = [k for k in expected if k not in weight_map and not k.startswith(E2_PREFIX)]
    if missing:
        raise KeyError(f"checkpoint {folder} lacks {len(missing)} weights of the model, e.g. {missing[:3]}")

    handles: dict[str, Any] = {}
    try:
        # Module by module, so that a partitioned model gathers one module's parameters at a time.
        for mod_name, module in model.named_modules():
            local = [n for n, _ in module.named_parameters(recurse=False)]
            local += [n for n, _ in module.named_buffers(recurse=False)]
            keys = [(n, f"{mod_name}.{n}" if mod_name else n) for n in local]
            keys = [(n, k) for n, k in keys if k in weight_map]
            if not keys:
                continue
            with gather(list(module.parameters(recurse=False))):
                for n, k in keys:
                    file = weight_map[k]
                    if file not in handles:
                        handles[file] = safe_open(folder / file, framework="pt")
                    _assign(module, n, handles[file].get_tensor(k))
    finally:
        handles.clear()
    if model.config.target_time_embed and not any(k.startswith(E2_PREFIX) for k in weight_map):
        model.init_target_embedder_from_main(gather_context)
        logger.info("%s has no target-time embedder (time_text_embed_2): copy-initialised it from "
                    "time_text_embed", folder)
    return [k for k in weight_map if k not in expected]


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    current = module._parameters.get(name)
    if current is None:
        current = module._buffers[name]
        if current.is_meta:
            module._buffers[name] = value.to(current.dtype)
        else:
            current.data.copy_(value.to(current.dtype))
        return
    if current.is_meta:
        module._parameters[name] = nn.Parameter(value.to(current.dtype), requires_grad=current.requires_grad)
    else:
        with torch.no_grad():
            current.data.copy_(value.to(device=current.device, dtype=current.dtype))


def _resolve_folder(path_or_hub_id, subfolder, kwargs) -> Path:
    local = Path(path_or_hub_id)
    if local.is_dir():
        return local / subfolder if subfolder else local
    from huggingface_hub import snapshot_download

    root = Path(snapshot_download(str(path_or_hub_id), allow_patterns=[f"{subfolder}/*"] if subfolder else None,
                                  **_hub_kwargs(kwargs)))
    return root / subfolder if subfolder else root


def _hub_kwargs(kwargs: dict) -> dict:
    keys = ("cache_dir", "revision", "token", "local_files_only")
    return {k: kwargs[k] for k in keys if k in kwargs}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None):
    if dtype is None:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------------------------------------
# the velocity network F(x_t, t, r, cond)
# ---------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/2)·(W/2), 4C]: the pipeline's 2×2 patch packing."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even for 2×2 packing, got {h}×{w}")
    return QwenImagePipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for a latent grid of ``height`` × ``width``."""
    # The pipeline's helper takes *pixel* sizes and a VAE factor; factor 1 makes them latent sizes.
    return QwenImagePipeline._unpack_latents(packed, height, width, 1)[:, :, 0]


def image_shapes(batch: int, height: int, width: int) -> list[list[tuple[int, int, int]]]:
    """``img_shapes`` for a latent grid of ``height`` × ``width``: one (frame, rows, cols) per sample."""
    return [[(1, height // 2, width // 2)]] * batch


class QwenImageVelocity(nn.Module):
    """TwinFlow's F(x_t, t, r, cond) over a ``TwinFlowQwenImageTransformer2DModel``.

    x_t     normalised VAE latents [B, C, H, W] (H, W even)
    t, r    [B] signed times in [−1, 1]
    cond    {"prompt_embeds": [B, L, D], "prompt_mask": [B, L]} (mask optional)
    returns the average velocity over [r, t], [B, C, H, W], in x_t's dtype.
    Inputs are cast to the transformer's compute dtype (that of ``img_in``).
    """

    def __init__(self, transformer: TwinFlowQwenImageTransformer2DModel):
        super().__init__()
        if transformer.config.patch_size != 2:
            raise ValueError("Qwen-Image packs 2×2 patches; patch_size must be 2, got "
                             f"{transformer.config.patch_size}")
        self.transformer = transformer

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.transformer.img_in.weight.dtype

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: dict) -> torch.Tensor:
        b, _, h, w = x_t.shape
        dtype = self.compute_dtype
        embeds = cond["prompt_embeds"].to(dtype)
        mask = cond.get("prompt_mask")
        if mask is not None and bool(mask.all()):
            mask = None  # the pipeline passes None for an all-valid batch (encode_prompt)
        out = self.transformer(hidden_states=pack_latents(x_t.to(dtype)), encoder_hidden_states=embeds,
                               encoder_hidden_states_mask=mask, timestep=t.reshape(b), target_timestep=r.reshape(b),
                               img_shapes=image_shapes(b, h, w), return_dict=False)[0]
        return unpack_latents(out, h, w).to(x_t.dtype)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def parameter_count(module: nn.Module, names: Iterable[str] | None = None) -> int:
    """Total parameter count (works on meta models); ``names`` restricts to those prefixes."""
    prefixes = tuple(names) if names else None
    return sum(p.numel() for n, p in module.named_parameters() if prefixes is None or n.startswith(prefixes))
