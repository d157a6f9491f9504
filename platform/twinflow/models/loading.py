"""Building and loading a TwinFlow transformer of any family, ready to train.

Building for 20B: ``load_twinflow_transformer`` goes through diffusers' ``from_pretrained`` (meta
init, then weights streamed in on CPU) or, with ``init_context`` (e.g. ``deepspeed.zero.Init``),
builds the module inside that context and streams the safetensors shards in module by module
through ``gather_context`` (e.g. ``GatheredParameters(params, modifier_rank=0)``).
``build_twinflow_transformer(config)`` makes random weights from a config (``QWEN_IMAGE_20B_CONFIG``
is the real model's) for memory checks. ``build_velocity_model(model_config)`` is what training calls.
The family's TwinFlow class comes from the folder (``models/families.py``) unless ``cls`` names it: the
same code streams a Qwen-Image, a SANA or any other family's checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from twinflow.models.target_time import E2_PREFIX

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# building and loading
# ---------------------------------------------------------------------------


def build_twinflow_transformer(config: dict[str, Any] | None = None, torch_dtype: torch.dtype | None = None,
                               init_context: ContextManager | None = None, cls: type | None = None) -> nn.Module:
    """Random-weight TwinFlow transformer from a config dict (default: the real Qwen-Image 20B one).

    ``init_context`` decides where the weights live: ``accelerate.init_empty_weights()`` (meta,
    no memory), ``deepspeed.zero.Init(...)`` (partitioned), or None (CPU, fully allocated).
    E2 is copy-initialised from E1 when the weights are materialised. ``cls``: the TwinFlow class
    (default: the family the config's ``_class_name`` names, else Qwen-Image).
    """
    if config is None:
        from twinflow.models.qwen_image import QWEN_IMAGE_20B_CONFIG

        config = QWEN_IMAGE_20B_CONFIG
    cls = cls or _class_for_config(config)
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    with _default_dtype(torch_dtype), (init_context or contextlib.nullcontext()):
        model = cls.from_config(cfg)
    return model


def _class_for_config(config: dict) -> type:
    """The TwinFlow class of a transformer config: its ``_class_name``'s family; a bare dict (no class name,
    as in the tests' and planner's configs) is Qwen-Image's, the platform's first family."""
    from twinflow.models.families import DEFAULT_FAMILY, backbone, backbone_for_transformer_class

    name = config.get("_class_name")
    return (backbone_for_transformer_class(name) if name else backbone(DEFAULT_FAMILY)).transformer_class()


def load_twinflow_transformer(path_or_hub_id: str | Path, subfolder: str | None = "transformer",
                              torch_dtype: torch.dtype | None = None, lora: Any = None, ema_adapter: bool = False,
                              gradient_checkpointing: bool = False, init_context: ContextManager | None = None,
                              gather_context: Callable[[list], ContextManager] | None = None,
                              full_trainable: bool = False, cls: type | None = None,
                              **from_pretrained_kwargs) -> nn.Module:
    """Load a transformer of any family (plain or TwinFlow) the way diffusers does, ready to train.

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
    cls              the family's TwinFlow transformer class (default: the one the transformer's
                     config.json ``_class_name`` belongs to, models/families.py).
    """
    config = None
    if cls is None or init_context is not None:
        config = _config_reader().load_config(path_or_hub_id, subfolder=subfolder,
                                              **_hub_kwargs(from_pretrained_kwargs))
        cls = cls or _class_for_config(config)
    if init_context is None:
        model = cls.from_pretrained(path_or_hub_id, subfolder=subfolder, dtype=torch_dtype, **from_pretrained_kwargs)
    else:
        model = build_twinflow_transformer(config, torch_dtype=torch_dtype, init_context=init_context, cls=cls)
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
                         **from_pretrained_kwargs) -> nn.Module:
    """``ModelConfig`` (models/config.py) -> the family's trainable velocity network F(x_t, t, r, cond).

    Full mode: every parameter trainable. LoRA mode: base frozen, "default" adapter + E2
    trainable, plus the frozen "ema" adapter when ``cfg.ema``.
    """
    cfg.validate()
    backbone = cfg.backbone()
    transformer = load_twinflow_transformer(
        cfg.path, cls=backbone.transformer_class(), subfolder=cfg.subfolder or None, torch_dtype=cfg.torch_dtype,
        lora=cfg.lora if cfg.mode == "lora" else None, ema_adapter=cfg.ema and cfg.mode == "lora",
        gradient_checkpointing=cfg.gradient_checkpointing, init_context=init_context,
        gather_context=gather_context, full_trainable=cfg.mode == "full", **from_pretrained_kwargs)
    transformer.train()
    return backbone.velocity(transformer)


def load_weights_into(model: nn.Module, folder: str | Path,
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
        logger.info("%s has no target-time embedder (%s): copy-initialised it from %s", folder,
                    E2_PREFIX[:-1], getattr(model, "E1_PATH", "E1"))
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


def _config_reader() -> type:
    """A diffusers ConfigMixin that reads any model's config.json (``load_config`` is a classmethod that only
    needs ``config_name``), so the family can be told from the config before its class is chosen."""
    from diffusers.configuration_utils import ConfigMixin

    class ModelConfigReader(ConfigMixin):
        config_name = "config.json"

    return ModelConfigReader


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
