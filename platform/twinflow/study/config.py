"""Config tree of the small-scale study, and its two presets (full, quick)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from twinflow.config.errors import require
from twinflow.method import TwinFlowConfig, fm, rcgm, twinflow
from twinflow.method.dmd import DMDConfig, dmd2, vsd
from twinflow.method.meanflow import MeanFlowConfig, SCMConfig
from twinflow.study.ablation import ABLATIONS
from twinflow.study.trainer import NetSettings, TrainSettings

DATASETS = ("digits", "mixture2d")
METHODS = ("fm", "rcgm", "twinflow")
RIVALS = ("meanflow", "scm", "dmd2", "vsd")
"""The paper's rivals (method/meanflow.py, method/dmd.py); ``--methods`` adds them to a study."""


def _study_method(cfg: TwinFlowConfig) -> TwinFlowConfig:
    # No CFG enhancement in the study: the flow-matching baseline samples without guidance, so
    # the comparison is between unguided distributions (set method.<m>.enhance_ratio to try it).
    cfg.enhance_ratio = 0.0
    return cfg


@dataclass
class Methods:
    """The three objectives compared; each is a full TwinFlowConfig (``--set method.twinflow.teacher=ema``)."""

    fm: TwinFlowConfig = field(default_factory=lambda: _study_method(fm()))
    rcgm: TwinFlowConfig = field(default_factory=lambda: _study_method(rcgm()))
    twinflow: TwinFlowConfig = field(default_factory=lambda: _study_method(twinflow()))
    meanflow: MeanFlowConfig = field(default_factory=MeanFlowConfig)
    scm: SCMConfig = field(default_factory=SCMConfig)
    dmd2: DMDConfig = field(default_factory=dmd2)
    """Distils the study's flow-matching run (``<dataset>.distill_steps`` after its ``steps``)."""
    vsd: DMDConfig = field(default_factory=vsd)


@dataclass
class EvalSettings:
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 100])
    seeds: int = 3
    """Independent evaluation seeds; every metric is the mean over them (std reported too)."""
    mixture_samples: int = 20_000
    """Generated (and fresh real) 2-D samples per seed; 5,000 cannot resolve the targets."""
    digits_samples_per_class: int = 0
    """0: as many per class as the real set has (1,797 in all)."""
    few_step_max_nfe: int = 4
    """RCGM/TwinFlow sample with the released few-step sampler (r = 0, ρ = 1) up to this NFE, and
    beyond it with ``many_step_style``; flow matching always integrates its ODE (Euler, r = t)."""
    many_step_style: Literal["any", "mul"] = "any"


@dataclass
class MixtureSettings:
    modes: int = 8
    seed: int = 0


@dataclass
class StudyConfig:
    out: str = "runs/study"
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    method: Methods = field(default_factory=Methods)
    workers: int = 2
    """Ray Train workers (CPU processes in one gloo group)."""
    parallel: Literal["runs", "data"] = "runs"
    """How the workers share the work (study/ray_job.py): ``runs`` — each worker trains whole runs
    alone (fastest for these small networks: no per-step all-reduce); ``data`` — every run is
    data-parallel (torch DDP) over all workers, like the Qwen-Image job (which uses DeepSpeed)."""
    digits: TrainSettings = field(default_factory=lambda: TrainSettings(steps=8000, lr=1e-3,
                                                                        net=NetSettings(width=256, depth=4)))
    mixture2d: TrainSettings = field(default_factory=lambda: TrainSettings(steps=10_000, lr=1e-3,
                                                                           net=NetSettings(width=256, depth=4)))
    mixture: MixtureSettings = field(default_factory=MixtureSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    train_seeds: int = 3
    """Independently trained runs per cell (training seed = <dataset>.seed + k); every metric is the
    mean over them with its spread (study/seeds.py). Evaluation seeds (eval.seeds) come on top."""
    ablation: list[str] = field(default_factory=list)
    """TwinFlow variants (study/ablation.py ABLATIONS) added to the comparison as cells named
    ``twinflow-<variant>``, each the TwinFlow cell with one change (--ablation)."""
    sweep_lam: list[float] = field(default_factory=list)
    """λ values for the λ ablation (--sweep-lam): TwinFlow alone on ``datasets`` at each λ, scored
    at 1 NFE (plus the other eval.nfe), written as results["lam_sweep"] and a λ plot."""

    def validate(self, path: str = "") -> None:
        for name in self.datasets:
            require(name in DATASETS, "datasets", f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
        for name in self.methods:
            require(name in METHODS + RIVALS, "methods",
                    f"unknown method {name!r}; choose from {', '.join(METHODS + RIVALS)}")
        for name in self.ablation:
            require(name in ABLATIONS, "ablation", f"unknown variant {name!r}; choose from {', '.join(ABLATIONS)}")
        require(self.workers >= 1, "workers", "must be >= 1")
        require(self.parallel in ("runs", "data"), "parallel", f"choose runs or data, got {self.parallel!r}")
        if self.parallel == "data":
            for name in DATASETS:
                s: TrainSettings = getattr(self, name)
                require(s.batch_size % self.workers == 0, f"{name}.batch_size",
                        f"{s.batch_size} is not divisible by workers={self.workers} (parallel: data)")
            for name in ("dmd2", "vsd"):
                # DDP averages the fake network's gradients, not those of a GAN head beside it
                require(not (name in self.methods and getattr(self.method, name).gan_weight > 0),
                        f"method.{name}.gan_weight", "the GAN head trains outside DDP; use parallel: runs "
                                                     "(or gan_weight: 0)")
        require(all(k >= 1 for k in self.eval.nfe), "eval.nfe", "every NFE must be >= 1")
        require(self.eval.seeds >= 1, "eval.seeds", "must be >= 1")
        require(self.train_seeds >= 1, "train_seeds", f"must be >= 1, got {self.train_seeds}")
        require(self.mixture.modes >= 1, "mixture.modes", "must be >= 1")
        require(all(0 <= lam <= 1 for lam in self.sweep_lam), "sweep_lam", "every λ must be in [0, 1]")


def full() -> StudyConfig:
    return StudyConfig()


def quick() -> StudyConfig:
    """Minutes on 2 cores: short runs, smaller evaluation. For tests and smoke runs, not for conclusions."""
    cfg = StudyConfig(out="runs/study-quick")
    cfg.digits.steps = 800
    cfg.mixture2d.steps = 2500
    cfg.digits.net = NetSettings(width=128, depth=3)
    for s in (cfg.digits, cfg.mixture2d):
        s.log_every = 100
        s.ema_decay = 0.99  # a 0.999 average would still remember the initial weights
    cfg.eval = EvalSettings(nfe=[1, 2, 4, 8, 100], seeds=1, mixture_samples=5000)
    cfg.train_seeds = 1
    return cfg


PAPER_LAMBDAS = [0.0, 1 / 6, 1 / 3, 1 / 2, 2 / 3]


PRESETS = {"full": full, "quick": quick}
