"""The front door of every job: --preset, --config, --set a.b=c, shortcut flags, --dry-run, --address.

    SHORTCUTS = (Shortcut("--checkpoint", "source={}", "training checkpoint or final/ folder"), ...)
    args = job_parser(__doc__, PRESETS, "default", SHORTCUTS).parse_args(argv)
    cfg = resolve_config(ExportConfig, args, PRESETS, SHORTCUTS)

Resolution order: preset (a Python function returning the tree) <- YAML file <- shortcut flags <- --set.
A shortcut flag is only a spelling of --set overrides (its table is the one place that says which), so
``--dry-run`` shows the same resolved tree either way. Config errors end the process with one line on
stderr naming the field and the fix, exit code 2, before Ray starts.
``--address`` picks the Ray cluster (twinflow.ray_env.connect): without it a job uses RAY_ADDRESS
(set by ``ray job submit``) or starts a fresh local Ray of its own; ``--address auto`` joins the
cluster already running on this machine.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar, Union

from twinflow.config.errors import ConfigError
from twinflow.config.tree import build

T = TypeVar("T")


@dataclass(frozen=True)
class Shortcut:
    """A flag that stands for --set overrides: ``sets`` are templates with ``{}`` for the flag's value
    (``"checkpoint={}"``, ``"benchmarks=[{}]"``, a fixed ``"watch_dir="``), or a function of the value
    and the parsed args returning the overrides. ``type=bool``: a switch (``--use-ema``)."""

    flag: str
    sets: Union[str, tuple[str, ...], Callable[[Any, argparse.Namespace], list[str]]]
    help: str = ""
    type: Callable = str
    nargs: str | None = None
    const: Any = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def overrides(self, value: Any, args: argparse.Namespace) -> list[str]:
        if callable(self.sets):
            return list(self.sets(value, args))
        templates = (self.sets,) if isinstance(self.sets, str) else self.sets
        return [t.format(value) for t in templates]


def job_parser(doc: str, presets: Mapping[str, Callable[[], object]], default_preset: str,
               shortcuts: Sequence[Shortcut] = ()) -> argparse.ArgumentParser:
    """Every job's parser: described by the first paragraph of its docstring (the rest is the usage the
    docstring shows), with the shared arguments; a job adds its own flags to it."""
    parser = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0])
    add_config_args(parser, presets, default_preset, shortcuts)
    return parser


def add_config_args(parser: argparse.ArgumentParser, presets: Mapping[str, Callable[[], object]],
                    default_preset: str, shortcuts: Sequence[Shortcut] = ()) -> None:
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
    for cut in shortcuts:
        what = cut.help + (f" (a shortcut for --set {cut.sets})" if isinstance(cut.sets, str) else "")
        if cut.type is bool:
            parser.add_argument(cut.flag, dest=cut.dest, action="store_true", default=None, help=what)
        else:
            parser.add_argument(cut.flag, dest=cut.dest, type=cut.type, nargs=cut.nargs, const=cut.const,
                                default=None, metavar=cut.metavar, help=what)


def shortcut_overrides(args: argparse.Namespace, shortcuts: Sequence[Shortcut]) -> list[str]:
    """The --set overrides the given shortcut flags stand for, in table order."""
    out: list[str] = []
    for cut in shortcuts:
        value = getattr(args, cut.dest, None)
        if value is not None and value is not False:
            out += cut.overrides(value, args)
    return out


def use_address(args: argparse.Namespace) -> None:
    """``--address``: the Ray cluster every later ``connect`` (and plain ``ray.init``) uses."""
    import os

    if getattr(args, "address", None):
        os.environ["RAY_ADDRESS"] = args.address


def preset_name(text: str) -> str:
    """Preset names are spelled with dashes; underscores are accepted for them."""
    return text.replace("_", "-")


def resolve_config(cls: type[T], args: argparse.Namespace, presets: Mapping[str, Callable[[], T]],
                   shortcuts: Sequence[Shortcut] = (), edits: Sequence[Callable[[dict], None]] = (),
                   preset: str | None = None, check: Callable[[T], None] | None = None) -> T:
    """preset <- --config YAML <- shortcut flags <- --set <- ``edits`` (functions of the raw tree, for
    options --set cannot spell), validated; or exit(2) with one line naming the field. Applies
    ``--address``. ``preset``: a job-level choice that replaces ``--preset`` (e.g. ``--quick``); ``check``:
    the validation, when not every node of the tree (config.tree.validate)."""
    use_address(args)
    try:
        return build(cls, presets[preset or args.preset](), args.config,
                     shortcut_overrides(args, shortcuts) + list(args.overrides), edits=edits,
                     check=check)
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
