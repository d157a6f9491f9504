"""The shared command line of every job: --preset, --config, --set a.b=c, --dry-run.

Resolution order: preset (a Python function returning the tree) <- YAML file <- --set.
Config errors end the process with one line on stderr and exit code 2, before Ray starts.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Mapping, TypeVar

from twinflow.config.errors import ConfigError
from twinflow.config.tree import build

T = TypeVar("T")


def add_config_args(parser: argparse.ArgumentParser, presets: Mapping[str, Callable[[], object]],
                    default_preset: str) -> None:
    parser.add_argument("--preset", default=default_preset, choices=sorted(presets),
                        help=f"named starting config (default: {default_preset})")
    parser.add_argument("--config", metavar="YAML", help="YAML file merged over the preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override applied last, e.g. --set twinflow.lam=0.25 (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config (and plan) and exit without starting Ray")


def resolve_config(cls: type[T], args: argparse.Namespace, presets: Mapping[str, Callable[[], T]]) -> T:
    """Build the config or exit(2) with a one-line message naming the field."""
    try:
        return build(cls, presets[args.preset](), args.config, args.overrides)
    except ConfigError as exc:
        exit_config_error(exc)
        raise  # unreachable


def exit_config_error(exc: BaseException) -> None:
    print(f"config error: {exc}", file=sys.stderr)
    sys.exit(2)
