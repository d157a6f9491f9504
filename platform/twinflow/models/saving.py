"""Writing a TwinFlow pipeline folder for a trained transformer of any family."""

from __future__ import annotations

import torch

from twinflow.models.families import backbone_for


def save_pipeline(transformer, base_path: str, folder, presets: dict, default_steps: int, dtype: torch.dtype) -> None:
    """Base pipeline components (loaded in ``dtype``) + ``transformer`` + sampler presets -> ``folder``, as the
    family's TwinFlow pipeline (models/families.py reads the family from ``base_path``): what a finished run
    (train/export.py) and the export job both write."""
    pipe = backbone_for(str(base_path)).pipeline_class().from_pretrained(base_path, transformer=transformer,
                                                                         dtype=dtype)
    pipe.set_sampler_presets(presets, default_steps)
    pipe.save_pretrained(folder)
