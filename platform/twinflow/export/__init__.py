"""Export a TwinFlow training run for use elsewhere (jobs/export.py; issue 5).

  config.py           ExportConfig (source, out, base model, EMA, formats, dtypes, sampler presets)
  sources.py          inspect_source / read_weights: checkpoints (DeepSpeed ZeRO consolidation, safe
                      loading) and final/ folders; ExportError for unusable inputs
  pipeline_folder.py  the trained transformer (LoRA merged / full weights) + a TwinFlowQwenImagePipeline folder
  lora_files.py       diffusers / ComfyUI LoRA files, E2 weights, and load_twinflow_lora(pipe, folder)
  exporter.py         export(cfg) -> manifest; plan(cfg) for --dry-run; export_pipeline_folder (evals hook)

Import the submodules; nothing heavy (diffusers, DeepSpeed) is imported until an export runs.
"""
