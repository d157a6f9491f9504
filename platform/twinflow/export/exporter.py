"""Export a training checkpoint or a run's final/ folder: ``export(cfg) -> manifest``.

Output layout (``<out>``, default ``<source>/export``):

    pipeline/                       TwinFlowQwenImagePipeline folder (from_pretrained-able; sampler
                                    presets + default NFE in model_index.json)
    lora/                           LoRA runs: pytorch_lora_weights.safetensors (diffusers),
                                    twinflow_target_embedder.safetensors (E2), comfyui_lora.safetensors,
                                    twinflow_lora.json (lora_files.py)
    export.json                     the manifest: source, step, mode, EMA or online, base model, files,
                                    the request (settings) it was made with

The folder is built next to ``<out>`` and renamed into place, so a crash never leaves a half export
that looks finished. An existing export made from the same source with the same settings is
reused as it is (``reused: true``) unless ``overwrite``; a different one is replaced. A non-empty
``<out>`` that is not an export is never touched.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from twinflow.export.config import LORA, PIPELINE, ExportConfig
from twinflow.export.sources import ExportError, Source, inspect_source, read_weights

MANIFEST = "export.json"


# ---------------------------------------------------------------------------
# what will be written
# ---------------------------------------------------------------------------


def resolve_base_model(source: Source, override: str = "") -> str:
    """The base pipeline to build on: ``override``, else the run's model.path (tiny test models are
    rebuilt from their preset, deterministically); a local path must exist."""
    from twinflow.models.config import is_hub_id
    from twinflow.named import is_named_model, resolve_model

    path = override or source.config.model.path
    flag = "--base-model" if override else "the run's model.path"
    if is_named_model(path) and not Path(path).exists():
        return resolve_model(path)
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ExportError(f"base model {path} ({flag}) is not a diffusers pipeline folder (no model_index.json); "
                              f"pass --base-model <Qwen-Image folder or hub id>")
        from twinflow.files import FileProblem, check_model_folder

        try:
            check_model_folder(local)
        except FileProblem as exc:
            raise ExportError(f"base model ({flag}): {exc}") from None
        return str(local)
    if not is_hub_id(path):
        raise ExportError(f"base model {path} ({flag}) does not exist here; pass --base-model <the Qwen-Image "
                          f"folder or hub id the run trained on>")
    return path  # a hub id: diffusers downloads it (or finds it in the HF cache)


def out_dir(cfg: ExportConfig, source: Source) -> Path:
    return Path(cfg.out).expanduser() if cfg.out else source.path / "export"


def formats_for(cfg: ExportConfig, source: Source) -> list[str]:
    """The requested formats this run can give (LoRA files only from LoRA runs)."""
    return [f for f in cfg.formats if f != LORA or source.mode == "lora"]


def dtypes(cfg: ExportConfig, source: Source) -> tuple[torch.dtype, torch.dtype]:
    from twinflow.dtypes import torch_dtype

    # "auto" here is the run's own dtypes, not the device rule of twinflow.dtypes
    model = torch_dtype(cfg.dtype) if cfg.dtype != "auto" else source.config.model.torch_dtype
    lora = torch_dtype(cfg.lora_dtype) if cfg.lora_dtype != "auto" else source.config.model.lora.torch_dtype
    return model, lora


def sampler_presets(cfg: ExportConfig) -> dict[str, dict]:
    from twinflow.models.pipeline import default_sampler_presets

    return default_sampler_presets(cfg.preset_steps)


def request(cfg: ExportConfig, source: Source) -> dict[str, Any]:
    """What identifies an export: the same request on the same source gives the same files."""
    return {"source": str(source.path.resolve()), "kind": source.kind, "tag": source.tag, "step": source.step,
            "use_ema": cfg.use_ema, "formats": formats_for(cfg, source), "dtype": cfg.dtype,
            "lora_dtype": cfg.lora_dtype, "default_steps": cfg.default_steps,
            "preset_steps": sorted(set(cfg.preset_steps)), "base_model": cfg.base_model}


def plan(cfg: ExportConfig) -> dict[str, Any]:
    """The dry run: what ``export(cfg)`` would read and write, from the source's metadata only."""
    cfg.validate()
    source = inspect_source(cfg.source)
    if cfg.use_ema and not source.has_ema:
        read_weights(source, use_ema=True)  # raises the one-line explanation
    model_dtype, lora_dtype = dtypes(cfg, source)
    return {"source": source.describe(), "out": str(out_dir(cfg, source)), "formats": formats_for(cfg, source),
            "weights": "ema" if cfg.use_ema else "online", "base_model": cfg.base_model or source.config.model.path,
            "dtype": str(model_dtype).removeprefix("torch."), "lora_dtype": str(lora_dtype).removeprefix("torch."),
            "default_steps": cfg.default_steps, "preset_steps": sorted(set(cfg.preset_steps))}


# ---------------------------------------------------------------------------
# the export
# ---------------------------------------------------------------------------


def existing_export(out: Path) -> dict | None:
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text())
        except json.JSONDecodeError:
            return None
    return None


def export(cfg: ExportConfig) -> dict[str, Any]:
    """Run the export; returns the manifest (also written to ``<out>/export.json``)."""
    cfg.validate()
    t0 = time.perf_counter()
    source = inspect_source(cfg.source)
    out = out_dir(cfg, source)
    req = request(cfg, source)
    previous = existing_export(out)
    if previous is not None and previous.get("request") == req and not cfg.overwrite:
        return {**previous, "out": str(out), "reused": True}
    if out.exists() and (not out.is_dir() or (previous is None and any(out.iterdir()))):
        raise ExportError(f"{out} exists and is not an export (no {MANIFEST}); choose another --out")

    formats = req["formats"]
    # The base model is only needed to build the pipeline; check it before the (slow) consolidation.
    base = resolve_base_model(source, cfg.base_model) if PIPELINE in formats else None
    weights = read_weights(source, cfg.use_ema)
    model_dtype, lora_dtype = dtypes(cfg, source)
    presets = sampler_presets(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        files: dict[str, str] = {}
        if LORA in formats:
            from twinflow.export.lora_files import write_lora_folder

            info = {"base_model": cfg.base_model or source.config.model.path, "step": source.step,
                    "weights": "ema" if weights.ema else "online", "sampler_presets": presets,
                    "default_steps": cfg.default_steps}
            lora_files = write_lora_folder(tmp / "lora", weights.lora, source.config.model.lora.alpha, info,
                                           dtype=lora_dtype)
            files.update({k: f"lora/{v}" for k, v in lora_files.items()})
        if PIPELINE in formats:
            from twinflow.export.pipeline_folder import build_transformer
            from twinflow.models.saving import save_pipeline

            transformer = build_transformer(weights, base, model_dtype)
            save_pipeline(transformer, base, tmp / "pipeline", presets, cfg.default_steps, model_dtype)
            del transformer
            files["pipeline"] = "pipeline"
        manifest = {"source": source.describe(), "step": source.step, "mode": source.mode,
                    "weights": "ema" if weights.ema else "online", "base_model": cfg.base_model or
                    source.config.model.path, "resolved_base_model": base, "files": files,
                    "sampler": {"default_steps": cfg.default_steps, "preset_steps": req["preset_steps"]},
                    "dtype": str(model_dtype).removeprefix("torch."), "request": req,
                    "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)  # our own earlier export (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**manifest, "out": str(out), "reused": False}


def export_pipeline_folder(checkpoint: str | Path, out: str | Path, **settings: Any) -> Path:
    """The evals hook: a pipeline-only export of ``checkpoint`` into ``out``; returns the pipeline folder."""
    cfg = dataclasses.replace(ExportConfig(source=str(checkpoint), out=str(out), formats=[PIPELINE]), **settings)
    result = export(cfg)
    return Path(out) / result["files"]["pipeline"]
