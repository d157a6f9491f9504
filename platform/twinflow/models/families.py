"""The registry of model families: ``model.family`` names → backbone implementations (models/backbone.py).

    backbone("sana")                        the SANA implementation
    backbone_for("/models/Sana_1600M")      read from the folder's model_index.json (or transformer/config.json)
    backbone_for("tiny")                    a named model (twinflow/named.py) knows its family

A family module is imported only when it is asked for (or when a folder's class names must be matched).
Adding a family: write ``models/<family>.py`` with a ``Backbone`` subclass instance and add one line here.
This is the only place that maps names to families; nothing else branches on a family's name.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from twinflow.config.errors import ConfigError
from twinflow.models.backbone import Backbone

FAMILIES: dict[str, str] = {
    "qwen-image": "twinflow.models.qwen_backbone:QWEN_IMAGE",
    "sana": "twinflow.models.sana:SANA",
}
AUTO = "auto"
"""``model.family: auto``: the family of the model folder, named model or hub id."""
DEFAULT_FAMILY = "qwen-image"
"""The family of a bare transformer config without a ``_class_name`` (tests' and planner's dicts)."""


def backbone(name: str) -> Backbone:
    if name not in FAMILIES:
        raise ConfigError(f"model.family: unknown family {name!r}; choose one of {', '.join(FAMILIES)} (or auto)")
    module, attr = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), attr)


def all_backbones() -> list[Backbone]:
    return [backbone(name) for name in FAMILIES]


def backbone_for_pipeline_class(class_name: str | None, where: str = "") -> Backbone:
    """The family whose pipelines include ``class_name`` (a model_index.json ``_class_name``)."""
    return _match("pipeline_class_names", class_name, where or "the folder", "pipeline")


def backbone_for_transformer_class(class_name: str | None, where: str = "") -> Backbone:
    """The family whose transformers include ``class_name`` (a transformer config.json ``_class_name``)."""
    return _match("transformer_class_names", class_name, where or "the transformer", "model")


def _match(attr: str, class_name: str | None, where: str, what: str) -> Backbone:
    for b in all_backbones():
        if class_name in getattr(b, attr):
            return b
    raise ConfigError(f"model.family: {where} holds a {class_name or what + ' without a class name'}, which is none "
                      f"of the known families ({', '.join(FAMILIES)}); set model.family if it is one")


def family_of_folder(path: str | Path) -> Backbone | None:
    """The family of a local diffusers folder: a pipeline folder (model_index.json) or a transformer folder
    (config.json); None when ``path`` is not a local folder."""
    folder = Path(path).expanduser()
    for name, match in (("model_index.json", backbone_for_pipeline_class),
                        ("config.json", backbone_for_transformer_class)):
        file = folder / name
        if file.is_file():
            try:
                class_name = json.loads(file.read_text()).get("_class_name")
            except (OSError, ValueError) as exc:
                raise ConfigError(f"model.path: {file} is not readable JSON ({exc})") from None
            return match(class_name, str(file))
    return None


def backbone_for(path: str, family: str = AUTO) -> Backbone:
    """The backbone of a model: ``family`` when it names one, else the named model's or the folder's."""
    if family != AUTO:
        return backbone(family)
    from twinflow.named import named_family

    named = named_family(path)
    if named is not None:
        return backbone(named)
    found = family_of_folder(path)
    if found is None:
        found = family_of_hub_id(path)
    if found is None:
        raise ConfigError(f"model.family: auto cannot tell the family of {path!r} (not a local diffusers folder, "
                          f"and its hub model_index.json is not readable from here); set model.family to one of "
                          f"{', '.join(FAMILIES)}")
    return found


def published(hub_id: str):
    """(backbone, PublishedConfig) of a checkpoint the families know by hub id (offline), else None."""
    for b in all_backbones():
        for config in b.published_configs().values():
            if config.hub_id == hub_id:
                return b, config
    return None


def family_of_hub_id(hub_id: str) -> Backbone | None:
    """A published checkpoint's family (the backbones' ``published_configs``; offline), else the family of the
    hub's model_index.json (downloaded by diffusers, or its cache); None when neither can be read."""
    known = published(hub_id)
    if known is not None:
        return known[0]
    try:
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(hub_id)
    except Exception:  # noqa: BLE001 - offline, private or not a pipeline: the caller says what to set
        return None
    return backbone_for_pipeline_class(index.get("_class_name"), f"hub id {hub_id}")
