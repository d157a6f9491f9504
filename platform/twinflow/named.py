"""Named inputs: short names a config may use instead of a path, built on first use into the cache.

    model.path / encode.model_path / --checkpoint
      tiny, tiny-qwen    random-weight tiny Qwen-Image pipelines (models/tiny_qwen.py), for plumbing
      tiny-sana          a random-weight tiny SANA pipeline (models/sana.py)
      digits-base        the miniature paper's *pretrained* digits base (mini/base.py): a trained VAE,
                         the tiny text encoder and a flow-matching-pretrained transformer
    data.source
      digits             scikit-learn's digits as captioned parquet shards (train/prepare.py)
      digits-base        the digits base's latent cache (written by jobs/precache.py while building it)

A provider is named by its module path and imported only when its name is used, so this table adds
no import edge between packages; the resolved folder, not the name, is what workers receive.
"""

from __future__ import annotations

import importlib
from typing import Any

MODELS = {
    "tiny": "twinflow.models.tiny_qwen:named_tiny",
    "tiny-qwen": "twinflow.models.tiny_qwen:named_tiny",
    "tiny-sana": "twinflow.models.sana:named_tiny",
    "digits-base": "twinflow.mini.base:named_base_pipeline",
}
FAMILIES = {"tiny": "qwen-image", "tiny-qwen": "qwen-image", "tiny-sana": "sana", "digits-base": "qwen-image"}
"""The model family of each named model (models/families.py), known before it is built."""
DATA_SOURCES = {
    "digits-base": "twinflow.mini.base:named_base_cache",
}


def _provider(spec: str):
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


def is_named_model(path: str) -> bool:
    return path in MODELS


def resolve_model(path: str, build: bool = True) -> str:
    """A named model -> its folder (built on first use unless ``build`` is false); any other path unchanged."""
    if path not in MODELS:
        return path
    return _provider(MODELS[path])(path, build)


def named_family(path: str) -> str | None:
    """The family of a named model, None for any other path."""
    return FAMILIES.get(path)


def resolve_data_source(source: str, build: bool = True) -> str:
    if source not in DATA_SOURCES:
        return source
    return _provider(DATA_SOURCES[source])(source, build)


def architecture(path: str) -> dict[str, Any] | None:
    """The transformer config of a named model without building it (for --dry-run memory plans)."""
    if path not in MODELS:
        return None
    module = MODELS[path].split(":")[0]
    return getattr(importlib.import_module(module), "named_architecture")(path)
