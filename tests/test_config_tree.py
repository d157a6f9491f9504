"""Typed config trees: YAML + --set overrides, errors that name the field."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from twinflow.config import ConfigError, build, dump_yaml, require
from twinflow.config.tree import parse_override


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)

    def validate(self, path):
        require(self.lr > 0, f"{path}.lr", "must be positive")


@dataclass
class Run:
    name: str = "demo"
    steps: int = 10
    mode: Literal["lora", "full"] = "lora"
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)


def test_overrides_parse_yaml_values_and_reach_nested_fields():
    cfg = build(Run, Run(), overrides=["optim.lr=3e-5", "steps=20", "optim.betas=[0.8, 0.95]", "tags=[a, b]"])
    assert cfg.optim.lr == pytest.approx(3e-5)
    assert cfg.steps == 20 and cfg.optim.betas == (0.8, 0.95) and cfg.tags == ["a", "b"]


def test_yaml_file_merges_over_preset(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.5\nmode: full\n")
    cfg = build(Run, Run(name="x"), p)
    assert (cfg.name, cfg.mode, cfg.optim.lr, cfg.optim.betas) == ("x", "full", 0.5, (0.9, 0.99))


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "optim.lrr: unknown field; did you mean 'lr'?"),
    ("steps=1.5", "steps: expected an integer"),
    ("mode=half", "mode: must be one of 'lora', 'full'"),
    ("optim.lr=-1", "optim.lr: must be positive"),
    ("optim.betas=[1]", "optim.betas: expected 2 values"),
    ("steps", "expected KEY=VALUE"),
])
def test_errors_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        build(Run, Run(), overrides=[override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_dump_yaml_round_trips(tmp_path):
    cfg = build(Run, Run(), overrides=["optim.lr=0.25", "extra.a=2"])
    p = tmp_path / "dump.yaml"
    p.write_text(dump_yaml(cfg))
    assert build(Run, None, p) == cfg


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        build(Run, Run(), tmp_path / "nope.yaml")


def test_parse_override_keeps_strings():
    assert parse_override("name=s3://bucket/run") == (["name"], "s3://bucket/run")


def test_empty_mapping_in_yaml_or_set_empties_a_preset_dict(tmp_path):
    preset = Run(extra={"a": 1.0})
    p = tmp_path / "c.yaml"
    p.write_text("extra: {}\n")
    assert build(Run, preset, p).extra == {}
    assert build(Run, preset, overrides=["extra={}"]).extra == {}
    assert build(Run, preset, overrides=["extra.b=2"]).extra == {"a": 1.0, "b": 2.0}
