"""The end-of-run artefact, <run>/final/: what the export job (issue 5) and users load.

    final/transformer/         full mode: the trained TwinFlowQwenImageTransformer2DModel
                               (diffusers save_pretrained; loads with from_pretrained)
    final/lora/                LoRA mode: adapter.safetensors (PEFT keys of the "default" adapter
                               + E2's weights, twinflow.models.lora.lora_state_dict), ema_adapter.
                               safetensors when the LoRA-EMA teacher ran, lora.json (LoraSettings
                               and the base model path)
    final/pipeline/            run.export_pipeline: a ready-to-load TwinFlowQwenImagePipeline folder
                               (LoRA merged into the base weights)
    final/metrics.jsonl        one row per logged step, the whole run
    final/config.yaml          the resolved config
    final/samples.png          the last sample grid

ZeRO-2 keeps whole weights on every rank, so rank 0 saves them directly. Under ZeRO-3 every rank
takes part in DeepSpeed's gathered 16-bit save (``stage3_gather_16bit_weights_on_model_save``),
which hands rank 0 one consolidated state dict; rank 0 loads it into a plain model on CPU.
Everything is written to a local temp folder and then copied to storage.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import torch

from twinflow.config.tree import dump_yaml, to_dict
from twinflow.train.config import TrainConfig
from twinflow.train.state import MODULE_PREFIX
from twinflow.train.tracking import write_jsonl

CONSOLIDATED = "consolidated_model.bin"


def gather_transformer(engine, cfg: TrainConfig, rank: int):
    """The whole trained transformer on rank 0 (None on other ranks). Collective under ZeRO-3."""
    velocity = engine.module
    if cfg.deepspeed.zero_stage != 3:
        return velocity.transformer if rank == 0 else None
    with tempfile.TemporaryDirectory(prefix="twinflow-gather-") as tmp:
        engine.save_16bit_model(tmp, CONSOLIDATED)
        if rank != 0:
            return None
        state = torch.load(os.path.join(tmp, CONSOLIDATED), map_location="cpu", weights_only=True)
    from accelerate import init_empty_weights

    from twinflow.models.lora import add_lora

    # A meta-device skeleton that takes the gathered tensors as they are (assign=True): at 20B a
    # materialised fp32 model next to the gathered state dict would need ~120 GB of host memory.
    with init_empty_weights():
        plain = type(velocity.transformer).from_config(dict(velocity.transformer.config))
        if cfg.is_lora:
            add_lora(plain, cfg.model.lora)
    state = {k[len(MODULE_PREFIX):]: v for k, v in state.items() if k.startswith(MODULE_PREFIX)}
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    if unexpected or missing:
        raise RuntimeError(f"consolidated ZeRO-3 weights do not fit the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    buffers = [n for n, b in plain.named_buffers() if b.is_meta]
    if buffers:
        raise RuntimeError(f"consolidated ZeRO-3 state lacks buffers {buffers[:3]}")
    return plain.requires_grad_(False)


def write_final(transformer, cfg: TrainConfig, model_path: str, out_dir: str | Path, history: list[dict],
                teacher_state: dict | None, grid=None) -> dict:
    """Rank 0: write the artefacts above into ``out_dir``; returns {name: relative path}."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    if cfg.is_lora:
        from twinflow.models.lora import lora_state_dict

        lora_dir = out / "lora"
        lora_dir.mkdir(exist_ok=True)
        save_file(_contiguous(lora_state_dict(transformer)), lora_dir / "adapter.safetensors")
        if teacher_state and "ema" in teacher_state:
            save_file(_contiguous(teacher_state["ema"]), lora_dir / "ema_adapter.safetensors")
        (lora_dir / "lora.json").write_text(json.dumps({"base_model": cfg.model.path, "resolved_base": model_path,
                                                        "settings": to_dict(cfg.model.lora)}, indent=2))
        written["lora"] = "lora"
    else:
        transformer.save_pretrained(out / "transformer")
        written["transformer"] = "transformer"
    if cfg.run.export_pipeline:
        written["pipeline"] = export_pipeline(transformer, cfg, model_path, out / "pipeline")
    write_jsonl(out / "metrics.jsonl", history)
    (out / "config.yaml").write_text(dump_yaml(cfg))
    if grid is not None:
        grid.save(out / "samples.png")
        written["samples"] = "samples.png"
    return written


def export_pipeline(transformer, cfg: TrainConfig, model_path: str, folder: Path) -> str:
    """A TwinFlowQwenImagePipeline folder: the base pipeline's VAE/text encoder + the trained transformer
    (LoRA merged), with the default sampler presets (the export job's defaults too)."""
    from twinflow.models.lora import is_lora, merge_lora
    from twinflow.method.sampler import PRESET_STEPS, RIVAL_PRESET_STEPS
    from twinflow.models.pipeline import DEFAULT_STEPS, default_sampler_presets
    from twinflow.models.saving import save_pipeline

    trained = copy.deepcopy(transformer).to("cpu")
    if is_lora(trained):
        merge_lora(trained, dtype=cfg.model.torch_dtype)
    trained.requires_grad_(False).eval()
    steps = PRESET_STEPS if cfg.method == "twinflow" else RIVAL_PRESET_STEPS
    save_pipeline(trained, model_path, folder, default_sampler_presets(steps, cfg.method), DEFAULT_STEPS,
                  cfg.model.torch_dtype)
    return "pipeline"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
