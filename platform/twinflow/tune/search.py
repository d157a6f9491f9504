"""Search-space specs: ``KIND:ARGS`` strings -> Ray Tune domains, checked before Ray starts.

    grid:0.1667,0.3333,0.5        every value, in order (tune.grid_search; trials = product of grids)
    choice:ema,self               one value drawn per trial (tune.choice)
    uniform:0,1                   continuous (tune.uniform)
    loguniform:1e-5,1e-3          continuous, uniform in log space (tune.loguniform; both bounds > 0)
    randint:1,4                   integer in [lo, hi) (tune.randint)

Values are read as YAML scalars, so ``choice:ema,self`` gives strings, ``grid:true,false`` booleans
and ``grid:1e-4,3e-4`` floats. On the command line: ``--search twinflow.rectify_coef=choice:0.25,0.5,1.0``.
Each searched field is checked by building the target's config with candidate values (every grid or
choice value; for ranges, the bounds and points in between), so a range that includes an invalid
value is a ConfigError naming the field, not a failed trial an hour later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import yaml

from twinflow.config.errors import ConfigError

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
_EXAMPLE = "e.g. grid:0.25,0.5 | choice:ema,self | uniform:0,1 | loguniform:1e-5,1e-3 | randint:1,4"


@dataclass(frozen=True)
class SearchSpec:
    kind: str
    values: tuple[Any, ...]
    """grid/choice: the values; uniform/loguniform/randint: (lo, hi)."""

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    def domain(self):
        """The Ray Tune search-space object."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        lo, hi = self.values
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](lo, hi)

    def candidates(self, points: int = 21) -> list[Any]:
        """Values to validate: all listed ones, or the range's bounds and interior points."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        lo, hi = self.values
        if self.kind == "randint":
            return list(range(int(lo), int(hi)))[: max(points, 2)] + [int(hi) - 1]
        if self.kind == "loguniform":
            a, b = math.log(lo), math.log(hi)
            return [math.exp(a + (b - a) * i / (points - 1)) for i in range(points)]
        return [lo + (hi - lo) * i / (points - 1) for i in range(points)]

    def __str__(self) -> str:
        return f"{self.kind}:{','.join(str(v) for v in self.values)}"


def _scalar(text: str, where: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: {text!r} is not a valid value ({exc.__class__.__name__})") from exc
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_spec(text: str, where: str = "search") -> SearchSpec:
    """``KIND:V1,V2,...`` -> SearchSpec; ``where`` names the field in error messages."""
    if ":" not in str(text):
        raise ConfigError(f"{where}: {text!r} has no kind; write KIND:VALUES, {_EXAMPLE}")
    kind, _, rest = str(text).partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r}; choose from {', '.join(KINDS)} ({_EXAMPLE})")
    parts = [p.strip() for p in rest.split(",")]
    if not rest.strip() or any(p == "" for p in parts):
        raise ConfigError(f"{where}: {text!r} has an empty value; {_EXAMPLE}")
    values = tuple(_scalar(p, where) for p in parts)
    if kind in ("grid", "choice"):
        return SearchSpec(kind, values)
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: {kind} takes two numbers LO,HI, got {rest!r}")
    lo, hi = values
    if not lo < hi:
        raise ConfigError(f"{where}: {kind} needs LO < HI, got {lo} and {hi}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs LO > 0, got {lo}")
    if kind == "randint":
        if int(lo) != lo or int(hi) != hi:
            raise ConfigError(f"{where}: randint takes integers, got {lo} and {hi}")
        return SearchSpec(kind, (int(lo), int(hi)))
    return SearchSpec(kind, (float(lo), float(hi)))


def parse_search_arg(text: str) -> tuple[str, SearchSpec]:
    """``--search a.b=KIND:ARGS`` -> ("a.b", spec)."""
    key, sep, spec = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--search {text!r}: expected FIELD=KIND:VALUES, e.g. "
                          f"--search twinflow.rectify_coef=choice:0.25,0.5,1.0")
    if any(not part for part in key.split(".")):
        raise ConfigError(f"--search {text!r}: the field must be a dotted name such as twinflow.rectify_coef")
    return key, parse_spec(spec.strip(), f"--search {key}")


def grid_size(specs: dict[str, SearchSpec]) -> int:
    """Trials per sample: the product of the grid sizes (1 without grids)."""
    n = 1
    for spec in specs.values():
        if spec.is_grid:
            n *= len(spec.values)
    return n
