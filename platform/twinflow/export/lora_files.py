"""A trained LoRA as files other tools load: diffusers, ComfyUI, and TwinFlow's target-time embedder.

    lora/pytorch_lora_weights.safetensors   diffusers: ``transformer.<module>.lora_A.weight`` /
                                            ``.lora_B.weight`` + the adapter config (rank, alpha, the exact
                                            module names) in the safetensors metadata, as diffusers'
                                            ``save_lora_weights(transformer_lora_adapter_metadata=…)``
                                            writes it. Loads with ``pipe.load_lora_weights(folder)`` on a
                                            QwenImagePipeline or TwinFlowQwenImagePipeline.
    lora/twinflow_target_embedder.safetensors   E2 (``time_text_embed_2.*``), fully trained in LoRA runs.
                                            diffusers' LoRA loader takes LoRA keys only, so it is a file of
                                            its own; ``load_twinflow_lora`` loads both (see below).
    lora/comfyui_lora.safetensors           ComfyUI: ``diffusion_model.<module>.lora_A.weight`` / ``.lora_B.weight``
                                            + ``diffusion_model.<module>.alpha``, no PEFT ``.default``.
    lora/twinflow_lora.json                 base model, rank, alpha, sampler presets and default NFE.

Key conventions, and where they come from:
  * diffusers 0.42 ``QwenImageLoraLoaderMixin``: keys prefixed ``transformer.`` are loaded as they
    are; a state dict with ``diffusion_model.`` / ``lora_unet_`` prefixes, ``.alpha`` keys or PEFT's
    ``default.`` goes through ``_convert_non_diffusers_qwen_lora_to_diffusers``, which folds alpha/rank
    into the weights (so diffusers also reads the ComfyUI file, and the tests use that as a check).
  * ComfyUI (comfyanonymous/ComfyUI, ``comfy/lora.py::model_lora_keys_unet``): for Qwen-Image every model
    weight ``diffusion_model.<name>.weight`` is reachable as the LoRA name ``diffusion_model.<name>`` (the
    generic rule), ``<name>`` and ``transformer.<name>``; ``comfy/weight_adapter/lora.py`` reads
    ``<lora name>.lora_B.weight`` (up) / ``.lora_A.weight`` (down) and scales by ``<lora name>.alpha`` /
    rank (1.0 without alpha). ComfyUI's Qwen-Image module tree (``comfy/ldm/qwen_image/model.py``)
    uses diffusers' module names (transformer_blocks.N.attn.to_q, img_mlp.net.0.proj,
    time_text_embed.timestep_embedder.linear_1, …), so names map 1:1.

ComfyUI has no target-time embedder: its sampler calls the model without r, i.e. r = t, where
TwinFlow's E2 term (t − r)·E2(r) vanishes. The ComfyUI LoRA therefore gives the trained model's
r = t velocity; few-step sampling with E2 needs diffusers + ``load_twinflow_lora`` (or the merged
pipeline folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from twinflow.export.sources import materialise
from twinflow.models.target_time import E2_PREFIX

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
TARGET_EMBEDDER_FILE = "twinflow_target_embedder.safetensors"
COMFYUI_LORA_FILE = "comfyui_lora.safetensors"
LORA_MANIFEST = "twinflow_lora.json"
DIFFUSERS_PREFIX = "transformer."
COMFYUI_PREFIX = "diffusion_model."
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def split_lora_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LoRA tensors, E2 tensors) of a ``lora_state_dict``-format dict; every key must be one of them."""
    lora = {k: v for k, v in state.items() if k.endswith(_SUFFIXES)}
    e2 = {k: v for k, v in state.items() if k.startswith(E2_PREFIX)}
    other = [k for k in state if k not in lora and k not in e2]
    if other:
        raise ValueError(f"LoRA state has keys that are neither lora_A/lora_B weights nor E2: {other[:3]}")
    return lora, e2


def lora_modules(lora: dict[str, torch.Tensor]) -> dict[str, int]:
    """Module name -> rank, checking every module has both halves."""
    modules: dict[str, int] = {}
    for key, value in lora.items():
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            if name + ".lora_B.weight" not in lora:
                raise ValueError(f"LoRA module {name} has lora_A but no lora_B")
            modules[name] = int(value.shape[0])
        elif key[: -len(".lora_B.weight")] + ".lora_A.weight" not in lora:
            raise ValueError(f"LoRA module {key[: -len('.lora_B.weight')]} has lora_B but no lora_A")
    return dict(sorted(modules.items()))


def comfyui_state(lora: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """ComfyUI names: ``diffusion_model.`` + the diffusers module name, with one ``.alpha`` per module."""
    out = {COMFYUI_PREFIX + k: v for k, v in lora.items()}
    for name in lora_modules(lora):
        out[f"{COMFYUI_PREFIX}{name}.alpha"] = torch.tensor(float(alpha))
    return out


def adapter_metadata(lora: dict[str, torch.Tensor], alpha: float) -> dict[str, Any]:
    """The LoraConfig diffusers rebuilds on load. Exact module names, not the training's suffix list:
    suffixes such as ``timestep_embedder.linear_1`` would also match E2's linears and give them an
    (empty) adapter."""
    ranks = lora_modules(lora)
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {name: r for name, r in ranks.items() if r != rank}
    return {"r": rank, "lora_alpha": float(alpha), "target_modules": sorted(ranks), "rank_pattern": pattern,
            "lora_dropout": 0.0, "bias": "none"}


def write_lora_folder(folder: str | Path, state: dict[str, torch.Tensor], alpha: float, info: dict[str, Any],
                      dtype: torch.dtype | None = None) -> dict[str, str]:
    """Write the four files above into ``folder``; ``info`` goes into the json (base model, sampler, …)."""
    from diffusers import QwenImagePipeline
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lora, e2 = split_lora_state(state)
    if not lora:
        raise ValueError("the LoRA state holds no lora_A/lora_B weights")
    cast = {k: _plain(v, dtype) for k, v in lora.items()}
    # diffusers' own writer: "transformer." prefix + the adapter config in the metadata.
    QwenImagePipeline.save_lora_weights(folder, transformer_lora_layers=cast, weight_name=DIFFUSERS_LORA_FILE,
                                        transformer_lora_adapter_metadata=adapter_metadata(lora, alpha))
    save_file({k: _plain(v, dtype) for k, v in e2.items()}, folder / TARGET_EMBEDDER_FILE)
    save_file(comfyui_state(cast, alpha), folder / COMFYUI_LORA_FILE, metadata={"format": "pt"})
    ranks = lora_modules(lora)
    manifest = {"diffusers_lora": DIFFUSERS_LORA_FILE, "target_embedder": TARGET_EMBEDDER_FILE,
                "comfyui_lora": COMFYUI_LORA_FILE, "rank": max(ranks.values()), "alpha": float(alpha),
                "modules": len(ranks), **info}
    (folder / LORA_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return {"diffusers_lora": DIFFUSERS_LORA_FILE, "target_embedder": TARGET_EMBEDDER_FILE,
            "comfyui_lora": COMFYUI_LORA_FILE, "lora_manifest": LORA_MANIFEST}


def _plain(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """CPU, ``dtype``, contiguous and owning its memory (safetensors refuses tensors that share it)."""
    return materialise(t.detach().to("cpu"), dtype)


def load_twinflow_lora(pipe, folder: str | Path, adapter_name: str | None = None, presets: bool = True) -> None:
    """Load an exported TwinFlow LoRA folder into a ``TwinFlowQwenImagePipeline`` built from the base model.

        pipe = TwinFlowQwenImagePipeline.from_pretrained("Qwen/Qwen-Image", dtype=torch.bfloat16)
        load_twinflow_lora(pipe, "<export>/lora")
        image = pipe("a red cat", num_inference_steps=2).images[0]

    which is: ``pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors")`` (diffusers),
    then E2's weights into ``pipe.transformer.time_text_embed_2`` (safetensors), then the run's sampler
    presets (``presets=False`` keeps the pipeline's). Replacing E2 is not undone by ``unload_lora_weights``.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    e2_target = getattr(pipe.transformer, "time_text_embed_2", None)
    if e2_target is None:
        raise ValueError("this pipeline's transformer has no target-time embedder (time_text_embed_2); build it as "
                         "twinflow.models.pipeline.TwinFlowQwenImagePipeline.from_pretrained(<base model>)")
    pipe.load_lora_weights(str(folder), weight_name=DIFFUSERS_LORA_FILE, adapter_name=adapter_name)
    e2 = {k[len(E2_PREFIX):]: v for k, v in load_file(folder / TARGET_EMBEDDER_FILE).items()}
    ref = next(e2_target.parameters())
    with torch.no_grad():
        e2_target.load_state_dict({k: v.to(device=ref.device, dtype=ref.dtype) for k, v in e2.items()})
    manifest = folder / LORA_MANIFEST
    if presets and manifest.is_file():
        info = json.loads(manifest.read_text())
        if info.get("sampler_presets"):
            pipe.set_sampler_presets(info["sampler_presets"], info.get("default_steps"))
