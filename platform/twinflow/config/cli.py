"""The shared command line of every job: --preset, --config, --set a.b=c, --dry-run, --address.

Resolution order: preset (a Python function returning the tree) <- YAML file <- --set.
Config errors end the process with one line on stderr and exit code 2, before Ray starts.
``--address`` picks the Ray cluster (twinflow.ray_env.connect): without it a job uses RAY_ADDRESS
(set by ``ray job submit``) or starts a fresh local Ray of its own; ``--address auto`` joins the
cluster already running on this machine.
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
    parser.add_argument("--preset", default=default_preset, choices=sorted(presets), type=preset_name,
                        help=f"named starting config (default: {default_preset}; '_' and '-' are the same)")
    parser.add_argument("--config", metavar="YAML", help="YAML file merged over the preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override applied last, e.g. --set twinflow.lam=0.25 (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config (and plan) and exit without starting Ray")
    parser.add_argument("--address", metavar="RAY_ADDRESS",
                        help="Ray cluster to use: host:port, or 'auto' for the one running on this machine "
                             "(default: $RAY_ADDRESS when set, else a fresh local Ray)")


def use_address(args: argparse.Namespace) -> None:
    """``--address``: the Ray cluster every later ``connect`` (and plain ``ray.init``) uses."""
    import os

    if getattr(args, "address", None):
        os.environ["RAY_ADDRESS"] = args.address


def preset_name(text: str) -> str:
    """Preset names are spelled with dashes; underscores are accepted for them."""
    return text.replace("_", "-")


def resolve_config(cls: type[T], args: argparse.Namespace, presets: Mapping[str, Callable[[], T]]) -> T:
    """Build the config or exit(2) with a one-line message naming the field; applies ``--address``."""
    use_address(args)
    try:
        return build(cls, presets[args.preset](), args.config, args.overrides)
    except ConfigError as exc:
        exit_config_error(exc)
        raise  # unreachable


def exit_config_error(exc: BaseException) -> None:
    print(f"config error: {exc}", file=sys.stderr)
    sys.exit(2)


def fail(exc: BaseException | str, code: int = 2) -> int:
    """One line on stderr for an unusable input (bad data, an unreadable file); returns ``code``."""
    print(f"error: {exc}", file=sys.stderr, flush=True)
    return code


def interrupted(what: str = "the same command") -> int:
    """Ctrl-C: say how to continue; exit code 130 (the shell's for SIGINT)."""
    print(f"\ninterrupted: re-run {what} to resume from where it stopped", file=sys.stderr, flush=True)
    return 130
