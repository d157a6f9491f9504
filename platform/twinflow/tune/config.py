"""Config tree of the λ / learning-rate sweep (``jobs/tune_lambda.py``), and its presets.

    target        digits | qwen: what one trial trains
    digits        DigitsTarget: one TwinFlow run on sklearn digits through the study's worker loop
    qwen          TrainConfig: the training job's whole config (jobs/train_qwen.py), e.g. the tiny
                  preset here or the 20B LoRA proxy on a cluster
    search        lam / lr specs (search.py) and more fields: {dotted path in the target: spec}
    tune          metric, mode, num_samples, max_concurrent_trials (0: derived, resources.py), capacity
    asha          early stopping: max_t (0: the target's horizon), grace_period, reduction_factor
    promote       --set overrides applied to the winner's train_qwen YAML (the full run after the proxy)

Paths in ``search.fields`` are dotted fields of the target's tree: ``twinflow.rectify_coef`` for
either target, ``train.net.width`` (digits) or ``data.resolution`` (qwen). ``search.lam`` and
``search.lr`` are shorthands for ``twinflow.lam`` and the target's learning rate (``train.lr`` /
``optim.lr``). ASHA's time axis is the optimizer step (metric ``step``), the same for both targets
and for a trial that resumes from a checkpoint; rungs sit at grace_period · reduction_factor^k
steps, which must be report steps (digits: train.log_every; qwen: logging.ray_report_every).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from twinflow.config.errors import ConfigError, require
from twinflow.config.tree import from_dict, set_dotted, to_dict, validate
from twinflow.method import TwinFlowConfig, twinflow
from twinflow.ray_resources import TRAIN
from twinflow.study.trainer import NetSettings, TrainSettings
from twinflow.train.config import TrainConfig
from twinflow.train.presets import qwen_image_lora, tiny
from twinflow.tune.probes import DigitsProbe
from twinflow.tune.search import parse_spec

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
TARGET_METRICS = {"digits": ("frechet_1nfe", "min"), "qwen": ("nfe_gap_mse", "min")}
LR_PATH = {"digits": "train.lr", "qwen": "optim.lr"}
LAM_PATH = "twinflow.lam"


def _study_twinflow() -> TwinFlowConfig:
    cfg = twinflow()
    cfg.enhance_ratio = 0.0  # as in the study: unguided digits (study/config.py)
    return cfg


@dataclass
class DigitsTarget:
    """One digits TwinFlow run of the small-scale study (study/trainer.py) per trial."""

    twinflow: TwinFlowConfig = field(default_factory=_study_twinflow)
    train: TrainSettings = field(default_factory=lambda: TrainSettings(
        steps=600, batch_size=256, lr=1e-3, log_every=100, ema_decay=0.99, net=NetSettings(width=128, depth=3)))
    workers: int = 1
    """Ray Train workers per trial (gloo DDP)."""
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    probe: DigitsProbe = field(default_factory=DigitsProbe)

    def validate(self, path: str = "digits") -> None:
        self.train.validate(f"{path}.train")
        require(self.workers >= 1, f"{path}.workers", "must be >= 1")
        require(self.train.batch_size % self.workers == 0, f"{path}.train.batch_size",
                f"{self.train.batch_size} is not divisible by workers={self.workers}")
        require(self.probe.samples_per_class >= 4, f"{path}.probe.samples_per_class",
                "must be >= 4 (the k-NN recall needs k + 1 = 4 generated digits)")
        for name, amount in self.resources_per_worker.items():
            require(amount > 0, f"{path}.resources_per_worker.{name}", f"must be > 0, got {amount}")


@dataclass
class SearchSettings:
    lam: str = "grid:0.1667,0.3333,0.5"
    """λ spec (twinflow.lam): a grid, or uniform:LO,HI inside [0, 1]; "" keeps the target's λ."""
    lr: str = "loguniform:3e-4,3e-3"
    """Learning-rate spec (train.lr / optim.lr), usually loguniform; "" keeps the target's."""
    fields: dict[str, str] = field(default_factory=dict)
    """More searched fields, {dotted path in the target: spec}; --search PATH=SPEC adds one."""

    def validate(self, path: str = "search") -> None:
        for name in ("lam", "lr"):
            if getattr(self, name):
                parse_spec(getattr(self, name), f"{path}.{name}")
        for key, spec in self.fields.items():
            parse_spec(spec, f"{path}.fields.{key}")


@dataclass
class TuneSettings:
    metric: str = ""
    """What ASHA stops on and the winner is picked by; "": digits frechet_1nfe, qwen nfe_gap_mse."""
    mode: Literal["", "min", "max"] = ""
    """"": the default metric's mode (min for both)."""
    num_samples: int = 1
    """Tune's num_samples: with grids, each grid point is run this many times (random specs are
    drawn anew each time); without grids, the number of trials."""
    max_concurrent_trials: int = 0
    """0: derived from the cluster and the per-trial needs (tune/resources.py)."""
    capacity: dict[str, float] = field(default_factory=dict)
    """Resources the sweep may use (autoscaling clusters); {}: ray.cluster_resources() at start."""
    seed: int = 0
    """Seed of the random draws (choice / uniform / loguniform), so a rerun proposes the same trials."""

    def validate(self, path: str = "tune") -> None:
        require(self.num_samples >= 1, f"{path}.num_samples", "must be >= 1")
        require(self.max_concurrent_trials >= 0, f"{path}.max_concurrent_trials", "must be >= 0 (0: derived)")
        for name, amount in self.capacity.items():
            require(amount > 0, f"{path}.capacity.{name}", f"must be > 0, got {amount}")
        require(not self.mode or bool(self.metric), f"{path}.mode", "set tune.metric together with tune.mode")


@dataclass
class AshaSettings:
    enabled: bool = True
    max_t: int = 0
    """Steps a trial may run; 0: the target's horizon (digits.train.steps / qwen.run.max_steps)."""
    grace_period: int = 100
    """Steps before the first stopping decision; a multiple of the report interval."""
    reduction_factor: int = 2
    """At each rung a trial continues only if it is in the best 1/reduction_factor so far."""

    def validate(self, path: str = "asha") -> None:
        require(self.max_t >= 0, f"{path}.max_t", "must be >= 0 (0: the target's horizon)")
        require(self.grace_period >= 1, f"{path}.grace_period", "must be >= 1")
        require(self.reduction_factor >= 2, f"{path}.reduction_factor", "must be >= 2")


@dataclass
class SweepConfig:
    target: Literal["digits", "qwen"] = "digits"
    name: str = "lam-lr"
    """Experiment name: <storage_path>/<name>. Re-running the same name resumes the sweep."""
    storage_path: str = "./runs/tune"
    """Local folder (single node) or s3://bucket/prefix (multi-node)."""
    results_dir: str = ""
    """Local folder for the table, plot and best-config YAMLs; "": <storage_path>/<name>/results
    for local storage, ./runs/tune-results/<name> for remote storage."""
    search: SearchSettings = field(default_factory=SearchSettings)
    tune: TuneSettings = field(default_factory=TuneSettings)
    asha: AshaSettings = field(default_factory=AshaSettings)
    promote: list[str] = field(default_factory=list)
    """--set overrides applied to the winner's train_qwen YAML, e.g. [run.max_steps=10000, data.resolution=1024]."""
    digits: DigitsTarget = field(default_factory=DigitsTarget)
    qwen: TrainConfig = field(default_factory=tiny)

    # ---- derived -----------------------------------------------------------------------------

    @property
    def metric(self) -> str:
        return self.tune.metric or TARGET_METRICS[self.target][0]

    @property
    def mode(self) -> str:
        return self.tune.mode or (TARGET_METRICS[self.target][1] if not self.tune.metric else "min")

    @property
    def horizon(self) -> int:
        """The steps of one trial when ASHA lets it finish."""
        return self.digits.train.steps if self.target == "digits" else self.qwen.run.max_steps

    @property
    def max_t(self) -> int:
        return self.asha.max_t or self.horizon

    @property
    def report_every(self) -> int:
        """Steps between the trial's reports to Tune."""
        if self.target == "digits":
            return self.digits.train.log_every
        return self.qwen.logging.ray_report_every or self.qwen.run.checkpoint_every

    def search_paths(self) -> dict[str, str]:
        """{dotted path in the target: spec} with the lam/lr shorthands resolved."""
        paths = {}
        if self.search.lam:
            paths[LAM_PATH] = self.search.lam
        if self.search.lr:
            paths[LR_PATH[self.target]] = self.search.lr
        paths.update(self.search.fields)  # a field named in full replaces its shorthand's spec
        return paths

    # ---- rules -------------------------------------------------------------------------------

    def validate(self, path: str = "") -> None:
        require(bool(_NAME.match(self.name)), "name", f"use letters, digits, '.', '_' or '-', got {self.name!r}")
        require(bool(self.storage_path), "storage_path", "set a local folder or s3://bucket/prefix")
        if self.target == "qwen" and self.metric == "nfe_gap_mse":
            require(self.qwen.probe.kind == "nfe_gap", "qwen.probe.kind",
                    "the sweep stops on nfe_gap_mse, which needs qwen.probe.kind: nfe_gap (or set tune.metric: "
                    "loss/total)")
        if self.target == "digits" and self.tune.metric:
            from twinflow.tune.probes import DIGITS_METRICS

            known = DIGITS_METRICS + ("loss/total",)
            require(self.metric in known, "tune.metric", f"digits trials report {', '.join(known)}; got {self.metric!r}")
        require(self.max_t <= self.horizon, "asha.max_t",
                f"{self.max_t} is beyond the trials' horizon of {self.horizon} steps; use 0 (the horizon)")
        every = self.report_every
        if self.asha.enabled:
            knob = "digits.train.log_every" if self.target == "digits" else "qwen.logging.ray_report_every"
            require(self.asha.grace_period % every == 0, "asha.grace_period",
                    f"{self.asha.grace_period} is not a multiple of the report interval {every} ({knob}): the "
                    f"rungs would fall between reports")
            require(self.asha.grace_period < self.max_t, "asha.grace_period",
                    f"must be below max_t={self.max_t}, or nothing is ever stopped early")
        check_search_space(self)


# ---------------------------------------------------------------------------
# a trial's config: the target with the sampled values set
# ---------------------------------------------------------------------------

SWEEP_OWNED = ("run.name", "run.storage_path")
"""Fields each trial sets itself (the Train run's place); they cannot be searched."""


def with_params(config, params: dict[str, Any], where: str):
    """A copy of a config tree with ``params`` ({dotted path: value}) set, validated. Setting λ clears
    explicit block weights, which would otherwise override it."""
    base = to_dict(config)
    for path, value in params.items():
        set_dotted(base, path.split("."), value)
        if path == LAM_PATH:
            set_dotted(base, ["twinflow", "block_weights"], None)
    out = from_dict(type(config), base, where)
    validate(out, where)
    return out


def trial_target(cfg, params: dict[str, Any]):
    """The target's config (DigitsTarget or TrainConfig) with the trial's values at their dotted paths."""
    return with_params(cfg.digits if cfg.target == "digits" else cfg.qwen, params, cfg.target)


def check_search_space(cfg) -> None:
    """Every searched path exists in the target and every candidate value builds a valid config."""
    for path, text in cfg.search_paths().items():
        if cfg.target == "qwen" and path in SWEEP_OWNED:
            raise ConfigError(f"search: {path} is set by the sweep for each trial; it cannot be searched")
        spec = parse_spec(text, f"search {path}")
        for value in spec.candidates():
            try:
                trial_target(cfg, {path: value})
            except ConfigError as exc:
                raise ConfigError(f"search {path}={spec}: the target refuses {path}={value!r}: {exc}") from None


# ---------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------


def digits() -> SweepConfig:
    """λ × lr on digits through Tune + Train on CPUs: 3 λ × 2 lr draws, 600 steps, ASHA from step 100."""
    return SweepConfig(target="digits", name="digits-lam-lr",
                       search=SearchSettings(lam="grid:0.1667,0.3333,0.5", lr="loguniform:3e-4,3e-3"),
                       tune=TuneSettings(num_samples=2), asha=AshaSettings(grace_period=100, reduction_factor=2))


def _qwen_tiny_proxy() -> TrainConfig:
    cfg = tiny()
    cfg.run = dataclasses.replace(cfg.run, max_steps=40, checkpoint_every=20, num_to_keep=1, export_pipeline=False)
    cfg.logging = dataclasses.replace(cfg.logging, ray_report_every=10, tensorboard=False, progress_bar=False)
    cfg.probe = dataclasses.replace(cfg.probe, kind="nfe_gap", reference_nfe=16)
    return cfg


def qwen_tiny() -> SweepConfig:
    """The qwen target on the tiny random-weight model (CPU): plumbing, not conclusions."""
    return SweepConfig(target="qwen", name="qwen-tiny-lam-lr", qwen=_qwen_tiny_proxy(),
                       search=SearchSettings(lam="grid:0.3333,0.5", lr="loguniform:3e-4,3e-3"),
                       tune=TuneSettings(num_samples=1), asha=AshaSettings(grace_period=10, reduction_factor=2))


def _lora_proxy() -> TrainConfig:
    """Qwen-Image LoRA at 512 px over a short horizon: the cheap proxy on which λ and lr are chosen."""
    cfg = qwen_image_lora()
    cfg.data = dataclasses.replace(cfg.data, resolution=512)
    cfg.run = dataclasses.replace(cfg.run, name="qwen-image-lora-proxy", max_steps=1200, checkpoint_every=400,
                                  num_to_keep=1)
    cfg.logging = dataclasses.replace(cfg.logging, ray_report_every=100, progress_bar=False)
    cfg.sample = dataclasses.replace(cfg.sample, height=512, width=512, seeds=[0, 1])
    cfg.probe = dataclasses.replace(cfg.probe, kind="nfe_gap", reference_nfe=16)
    return cfg


def qwen_lora_proxy() -> SweepConfig:
    """Qwen-Image 20B LoRA proxy on a GPU cluster: one 8-GPU node per trial, ASHA from step 200."""
    return SweepConfig(target="qwen", name="qwen-lora-lam-lr", storage_path="s3://your-bucket/twinflow/tune",
                       qwen=_lora_proxy(),
                       search=SearchSettings(lam="grid:0.1667,0.25,0.3333,0.4167,0.5", lr="loguniform:3e-5,3e-4"),
                       # Two 8-GPU training nodes once scaled up (cluster/): 2 trials at a time.
                       tune=TuneSettings(num_samples=2, capacity={"GPU": 16.0, TRAIN: 16.0}),
                       asha=AshaSettings(grace_period=200, reduction_factor=3),
                       promote=["run.name=qwen-image-lora-tuned", "run.max_steps=10000", "run.checkpoint_every=500",
                                "data.resolution=1024", "sample.height=1024", "sample.width=1024",
                                "logging.ray_report_every=0", "probe.kind=none"])


def _digits_base_proxy(steps: int = 400) -> TrainConfig:
    from twinflow.train.presets import digits as digits_distillation

    cfg = digits_distillation()
    cfg.run = dataclasses.replace(cfg.run, max_steps=steps, checkpoint_every=steps, num_to_keep=1,
                                  export_pipeline=False)
    cfg.logging = dataclasses.replace(cfg.logging, ray_report_every=100, tensorboard=False, progress_bar=False,
                                      mlflow="off")
    cfg.sample = dataclasses.replace(cfg.sample, base_nfe=[])
    cfg.probe = dataclasses.replace(cfg.probe, kind="digits", nfe=[1], images_per_prompt=16, base_nfe=[])
    return cfg


def digits_base_lam() -> SweepConfig:
    """The miniature paper's λ curve: TwinFlow LoRA on the pretrained digits base (the make-demo run,
    shorter) at λ ∈ {0, 1/6, 1/3, 1/2, 2/3}, scored by the digits probe at 1 NFE; every trial runs to
    the end (a curve, not a search: no early stopping), one at a time."""
    return SweepConfig(target="qwen", name="digits-base-lam", qwen=_digits_base_proxy(),
                       search=SearchSettings(lam="grid:0,0.1667,0.3333,0.5,0.6667", lr=""),
                       tune=TuneSettings(metric="digits_frechet_1nfe", mode="min", max_concurrent_trials=1),
                       asha=AshaSettings(enabled=False, grace_period=100),
                       promote=["run.max_steps=600", "run.checkpoint_every=200", "logging.ray_report_every=0"])


PRESETS = {"digits": digits, "qwen-tiny": qwen_tiny, "qwen-lora-proxy": qwen_lora_proxy,
           "digits-base-lam": digits_base_lam}


def build_sweep(preset: SweepConfig, yaml_path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                searches: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """preset <- YAML <- --set <- --search FIELD=KIND:ARGS, then validation (config.tree.build with the
    searches as an edit: their field names contain dots and so cannot go through --set)."""
    from twinflow.config.tree import build

    return build(SweepConfig, preset, yaml_path, overrides, edits=[search_edit(searches)])


def search_edit(searches: list[str] | tuple[str, ...]):
    """``--search FIELD=KIND:ARGS`` as an edit of the raw sweep tree: lam / lr are the search section's own
    fields, any other dotted path goes under search.fields."""
    from twinflow.tune.search import parse_search_arg

    def edit(data: dict) -> None:  # parsed here, inside the build: a bad --search is a config error
        for key, spec in (parse_search_arg(text) for text in searches):
            if key in ("lam", "lr"):
                data.setdefault("search", {})[key] = str(spec)
            else:
                data.setdefault("search", {}).setdefault("fields", {})[key] = str(spec)

    return edit
