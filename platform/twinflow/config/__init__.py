"""Typed config trees loaded from YAML with dotted ``--set`` overrides."""

from twinflow.config.errors import ConfigError, require
from twinflow.config.tree import build, dump_yaml, from_dict, to_dict, validate

__all__ = ["ConfigError", "require", "build", "dump_yaml", "from_dict", "to_dict", "validate"]
