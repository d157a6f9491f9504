"""Typed config trees: dataclasses <-> dicts/YAML, dotted overrides, validation.

A config is a tree of dataclasses. YAML is only its serialisation: loading goes
YAML -> dict -> (overrides) -> dataclasses, and every step reports errors as one
line that names the dotted field and what to do about it. Validation is a
``validate(self, path)`` method on any dataclass of the tree; the walker calls it
bottom-up after the tree is built.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union

import yaml

from twinflow.config.errors import ConfigError

T = TypeVar("T")


# ---------------------------------------------------------------------------
# dict -> dataclass
# ---------------------------------------------------------------------------


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build ``cls`` from a (possibly partial) mapping; missing fields keep defaults."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping of fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(fields)}"
        raise ConfigError(f"{_join(path, key)}: unknown field; {hint}")
    kwargs = {name: _convert(hints[name], data[name], _join(path, name)) for name in fields if name in data}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a __post_init__ complaint
        raise ConfigError(f"{path or cls.__name__}: {exc}") from exc


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, path)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(vt, v, _join(path, k)) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# ---------------------------------------------------------------------------
# dataclass -> dict / YAML
# ---------------------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    """Plain-Python view of a config tree (tuples become lists, for YAML/JSON)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None, width=100)


# ---------------------------------------------------------------------------
# overrides and loading
# ---------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], value); the value is parsed as YAML (``1e-4``, ``[1, 2]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set twinflow.lam=0.25")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key must be a dotted field name such as optim.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc.__class__.__name__})") from exc
    return key.split("."), value


def set_dotted(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def deep_merge(base: dict, update: Mapping) -> dict:
    """Nested mappings merge key by key; an explicit empty mapping ({}) replaces (empties) the base."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and v and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def merge_into(cls: Any, base: dict, update: Mapping) -> dict:
    """``deep_merge`` guided by the dataclass tree: sections (dataclass-typed fields) merge key by
    key, but a field typed as a plain mapping (e.g. ``resources_per_worker``) is *replaced*: a YAML
    that says ``{GPU: 1}`` must not inherit the preset's ``{CPU: 0.5}``."""
    hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
    out = copy.deepcopy(base)
    for k, v in update.items():
        tp = _dataclass_of(hints.get(k))
        if tp is not None and isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge_into(tp, out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _dataclass_of(tp: Any) -> Any:
    """The dataclass type of a field annotation (``X`` or ``X | None``), else None."""
    if tp is None:
        return None
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping of sections")
    return data


def build(cls: type[T], base: T | Mapping | None = None, yaml_path: str | Path | None = None,
          overrides: list[str] | tuple[str, ...] = (), edits=(), check=None) -> T:
    """base (preset object or dict) <- YAML file <- --set overrides <- ``edits`` (callables that change
    the raw tree in place), then ``check`` (default: ``validate``, every node of the tree)."""
    data = to_dict(base) if dataclasses.is_dataclass(base) else dict(base or {})
    if yaml_path:
        data = merge_into(cls, data, read_yaml(yaml_path))
    for text in overrides:
        keys, value = parse_override(text)
        set_dotted(data, keys, value)
    for edit in edits:
        edit(data)
    cfg = from_dict(cls, data)
    (check or validate)(cfg)
    return cfg


def validate(obj: Any, path: str = "") -> None:
    """Call ``validate(path)`` on every dataclass of the tree, children first."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            validate(child, _join(path, f.name))
    check = getattr(obj, "validate", None)
    if callable(check):
        check(path)


def replace(obj: T, **changes: Any) -> T:
    return dataclasses.replace(obj, **changes)
