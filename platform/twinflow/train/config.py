"""The training job's config tree (``jobs/train_qwen.py``): one dataclass per section.

    model      ModelConfig   which checkpoint, LoRA or full, dtype, gradient checkpointing
    data       DatasetConfig          raw image-text shards or a latent cache (twinflow.data)
    encode     EncodeSettings         in-worker encoding of raw data and of the sample prompts
    twinflow   TwinFlowConfig         the objective: λ / block weights, teacher, losses
    optim      OptimConfig            AdamW and the LR schedule (constant / cosine, warm-up)
    deepspeed  DeepSpeedSettings      ZeRO stage, offload, precision, clipping, micro-batch, accumulation
    scaling    ScalingSettings        Ray Train workers, GPUs, resources, collective timeout
    run        RunSettings            name, storage (local or s3://), checkpoints, failures, steps, NaN limit
    sample     SampleSettings         fixed prompts × seeds, NFE columns, how often
    logging    LoggingSettings        TensorBoard under the run, MLflow when MLFLOW_TRACKING_URI is set
    probe      ProbeSettings          cheap quality proxy in every Ray report (Tune's early stopping)
    debug      DebugSettings          fault injection (worker exits, NaN losses) for tests and rehearsals

Two special values make the no-argument default self-contained: ``model.path: tiny`` builds the
random-weight tiny Qwen-Image into ~/.cache/twinflow, and ``data.source: digits`` writes
scikit-learn's handwritten digits as image-text parquet shards next to it (train/prepare.py).

Cross-section rules live in ``TrainConfig.validate`` (global batch vs the λ blocks, ZeRO-3 and
teacher modes, offload and optimizer, precision and dtype), so every mistake is one
``ConfigError`` line before Ray starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from twinflow.config.errors import ConfigError, require
from twinflow.data.config import DatasetConfig
from twinflow.method.blocks import BatchLayout, BlockWeights, block_counts
from twinflow.method.config import TwinFlowConfig
from twinflow.method.dmd import DMDConfig, dmd2, vsd
from twinflow.method.meanflow import MeanFlowConfig, SCMConfig
from twinflow.models.config import ModelConfig
from twinflow.ray_resources import TRAIN

TINY_MODEL = "tiny"
DIGITS_SOURCE = "digits"
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class EncodeSettings:
    max_sequence_length: int = 512
    """Prompt tokens kept by the text encoder (raw data and sample prompts)."""
    device: str = "auto"
    """Where raw data is encoded inside each worker: auto (the worker's GPU, else CPU), cpu, cuda."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""

    def validate(self, path: str = "encode") -> None:
        require(1 <= self.max_sequence_length <= 1024, f"{path}.max_sequence_length",
                f"must be in [1, 1024] (Qwen-Image's limit), got {self.max_sequence_length}")
        require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), f"{path}.device",
                f"must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    eps: float = 1e-8
    schedule: Literal["constant", "cosine"] = "constant"
    """constant (the reference), or cosine decay from lr to lr·min_lr_ratio at run.max_steps."""
    warmup_steps: int = 0
    """Linear warm-up over this many optimizer steps: lr/warmup_steps on the first, lr on the last
    (twinflow.method.lr_schedule)."""
    min_lr_ratio: float = 0.0

    def validate(self, path: str = "optim") -> None:
        require(self.lr > 0, f"{path}.lr", f"must be > 0, got {self.lr}")
        require(all(0 <= b < 1 for b in self.betas), f"{path}.betas", f"each must be in [0, 1), got {self.betas}")
        require(self.weight_decay >= 0, f"{path}.weight_decay", "must be >= 0")
        require(self.eps > 0, f"{path}.eps", "must be > 0")
        require(self.warmup_steps >= 0, f"{path}.warmup_steps", "must be >= 0")
        require(0 <= self.min_lr_ratio <= 1, f"{path}.min_lr_ratio", "must be in [0, 1]")


@dataclass
class DeepSpeedSettings:
    zero_stage: int = 2
    """2: optimizer state + gradients sharded (LoRA, or full models that fit per GPU in bf16);
    3: parameters sharded too (full-parameter 20B)."""
    offload_optimizer: bool = False
    """Optimizer state and step on CPU (DeepSpeed's CPUAdam; needs optimizer: deepspeed)."""
    offload_params: bool = False
    """ZeRO-3 only: parameters live on CPU between uses."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 on GPU workers, fp32 on CPU workers."""
    gradient_clipping: float = 1.0
    """Max global grad norm (0 disables clipping)."""
    micro_batch_per_gpu: int = 4
    gradient_accumulation: int = 1
    optimizer: Literal["torch", "deepspeed"] = "torch"
    """torch: a client torch.optim.AdamW (no op build); deepspeed: DeepSpeed's fused AdamW
    (FusedAdam on GPU, DeepSpeedCPUAdam with offload; JIT-built on first use)."""
    param_persistence_threshold: int | None = None
    """ZeRO-3: parameters smaller than this many elements stay whole on every rank (DeepSpeed's
    stage3_param_persistence_threshold); None keeps DeepSpeed's default (1e5)."""
    extra: dict = field(default_factory=dict)
    """Raw DeepSpeed config merged last (nested dicts merge), e.g. {zero_optimization: {reduce_bucket_size: 5e8}}."""

    def validate(self, path: str = "deepspeed") -> None:
        require(self.zero_stage in (2, 3), f"{path}.zero_stage", f"must be 2 or 3, got {self.zero_stage}")
        require(not self.offload_params or self.zero_stage == 3, f"{path}.offload_params",
                "parameter offload needs zero_stage: 3")
        require(not self.offload_optimizer or self.optimizer == "deepspeed", f"{path}.offload_optimizer",
                "optimizer offload runs DeepSpeed's CPUAdam: set deepspeed.optimizer: deepspeed")
        require(self.gradient_clipping >= 0, f"{path}.gradient_clipping", "must be >= 0 (0 disables clipping)")
        require(self.micro_batch_per_gpu >= 1, f"{path}.micro_batch_per_gpu", "must be >= 1")
        require(self.gradient_accumulation >= 1, f"{path}.gradient_accumulation", "must be >= 1")
        require(self.param_persistence_threshold is None or self.param_persistence_threshold >= 0,
                f"{path}.param_persistence_threshold", "must be >= 0 or null")


@dataclass
class ScalingSettings:
    num_workers: int = 8
    """Ray Train workers = data-parallel ranks (one per GPU)."""
    use_gpu: bool = True
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"GPU": 1.0, TRAIN: 1.0})
    """GPU presets ask for the training node type's custom resource (cluster/README.md); CPU presets
    ask for a fraction of a CPU so Ray Data's read tasks still get one."""
    timeout_s: int = 1800
    """Collective timeout (TorchConfig.timeout_s): a dead peer fails the step instead of hanging."""
    threads_per_worker: int = 0
    """torch CPU threads per worker; 0: the CPU count in resources_per_worker (at least 1), or, when
    it asks for none, the node's cores divided by its workers."""

    def validate(self, path: str = "scaling") -> None:
        require(self.num_workers >= 1, f"{path}.num_workers", "must be >= 1")
        require(self.timeout_s >= 10, f"{path}.timeout_s", "must be >= 10 seconds")
        require(self.threads_per_worker >= 0, f"{path}.threads_per_worker", "must be >= 0")
        for name, amount in self.resources_per_worker.items():
            require(amount > 0, f"{path}.resources_per_worker.{name}", f"must be > 0, got {amount}")
        if not self.use_gpu:
            require("GPU" not in self.resources_per_worker, f"{path}.resources_per_worker",
                    "asks for GPUs while scaling.use_gpu is false; drop GPU or set use_gpu: true")


@dataclass
class RunSettings:
    name: str = "twinflow-qwen-image"
    """The run's folder under storage_path; re-submitting the same name resumes from its last checkpoint."""
    storage_path: str = "./runs"
    """Local folder (single node) or s3://bucket/prefix (multi-node: every node must reach it)."""
    max_steps: int = 10000
    """Optimizer steps of the whole run (a resumed run continues up to it)."""
    stop_at_step: int | None = None
    """End this submission after this step (checkpointed), e.g. to fit a time slot; re-submitting
    without it continues to max_steps. The LR schedule's horizon stays max_steps."""
    checkpoint_every: int = 500
    """Steps between checkpoints; the last step (and stop_at_step) always checkpoints."""
    num_to_keep: int | None = 3
    """Checkpoints kept in storage (null keeps all)."""
    max_failures: int = 3
    """Worker/node failures survived by restarting from the last checkpoint (-1: no limit)."""
    nan_limit: int = 5
    """Non-finite steps in a row that stop the run (each one is skipped and counted)."""
    seed: int = 0
    log_every: int = 1
    """Steps between metric rows (TensorBoard, MLflow, the metrics log)."""
    export_pipeline: bool = False
    """At the end, also write a ready-to-load TwinFlowQwenImagePipeline folder (merged weights);
    the final transformer / LoRA weights are always written to <run>/final."""

    def validate(self, path: str = "run") -> None:
        require(bool(_RUN_NAME.match(self.name)), f"{path}.name",
                f"use letters, digits, '.', '_' or '-' (no slashes), got {self.name!r}")
        require(bool(self.storage_path), f"{path}.storage_path", "set a local folder or s3://bucket/prefix")
        scheme = self.storage_path.split("://", 1)[0] if "://" in self.storage_path else "file"
        require(scheme in ("file", "s3", "gs"), f"{path}.storage_path",
                f"must be a local path, s3:// or gs://, got {self.storage_path!r}")
        require(self.max_steps >= 1, f"{path}.max_steps", "must be >= 1")
        require(self.stop_at_step is None or 1 <= self.stop_at_step <= self.max_steps, f"{path}.stop_at_step",
                f"must be in [1, max_steps={self.max_steps}] or null")
        require(self.checkpoint_every >= 1, f"{path}.checkpoint_every", "must be >= 1")
        require(self.num_to_keep is None or self.num_to_keep >= 1, f"{path}.num_to_keep", "must be >= 1 or null")
        require(self.max_failures >= -1, f"{path}.max_failures", "must be >= 0, or -1 for no limit")
        require(self.nan_limit >= 1, f"{path}.nan_limit", "must be >= 1")
        require(self.log_every >= 1, f"{path}.log_every", "must be >= 1")


@dataclass
class SampleSettings:
    enabled: bool = True
    prompts: list[str] = field(default_factory=lambda: [
        "a photo of a red apple on a wooden table",
        "a watercolor painting of a lighthouse at sunset",
    ])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Grid rows are (prompt, seed) pairs, the same every time so grids compare across steps."""
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Grid columns: sampler steps (method/sampler.py)."""
    sampler: Literal["few", "ode"] = "few"
    """few: TwinFlow's released few-step grids; ode: Euler on the instantaneous velocity (r = t), the
    sampler of a flow-matching model (pretraining a base)."""
    base_nfe: list[int] = field(default_factory=list)
    """Columns of the *starting* model (rendered once, before any step; Euler on r = t), left of the
    trained ones, e.g. [100, 1]: what a distillation run starts from and what it must beat."""
    every: int = 0
    """Extra grids every N steps (0: none); a grid is always saved beside each checkpoint."""
    height: int = 1024
    width: int = 1024

    def validate(self, path: str = "sample") -> None:
        if not self.enabled:
            return
        require(len(self.prompts) >= 1, f"{path}.prompts", "list at least one prompt (or set sample.enabled: false)")
        require(len(self.seeds) >= 1, f"{path}.seeds", "list at least one seed")
        require(len(self.nfe) >= 1 and all(n >= 1 for n in self.nfe), f"{path}.nfe",
                f"list step counts >= 1, e.g. [1, 2, 4]; got {self.nfe}")
        require(self.every >= 0, f"{path}.every", "must be >= 0")
        require(all(n >= 1 for n in self.base_nfe), f"{path}.base_nfe", f"list step counts >= 1, got {self.base_nfe}")
        for name in ("height", "width"):
            v = getattr(self, name)
            require(v >= 16 and v % 16 == 0, f"{path}.{name}", f"must be a positive multiple of 16, got {v}")


@dataclass
class LoggingSettings:
    tensorboard: bool = True
    """Event files under <run>/tensorboard (synced at checkpoints when the run lives on S3)."""
    mlflow: Literal["auto", "on", "off"] = "auto"
    """auto: log to MLflow when MLFLOW_TRACKING_URI is set; on: require it."""
    mlflow_experiment: str = "twinflow"
    progress_bar: bool = True
    ray_report_every: int = 0
    """Also report metrics to Ray Train (callbacks, Tune) every N steps; 0: only with checkpoints.
    A report waits for the controller's next poll (~2 s), so per-step reports slow short steps."""

    def validate(self, path: str = "logging") -> None:
        require(self.ray_report_every >= 0, f"{path}.ray_report_every", "must be >= 0")


@dataclass
class ProbeSettings:
    """A cheap quality proxy added to every Ray report (checkpoints and logging.ray_report_every), so
    that Ray Tune's ASHA can stop bad trials on sample quality, not on the loss alone (jobs/tune_lambda.py).

    Kinds (train/samples.py ``SampleGrid.nfe_gap``):
      none     nothing (the default; no cost)
      nfe_gap  metric ``nfe_gap_mse``: mean squared difference, in normalised latent space, between
               the 1-NFE sample and a ``reference_nfe``-step ODE sample of the same network from
               the same noise, on the fixed sample prompts × seeds (section ``sample``). It falls as
               the one-step generator agrees with the model's own many-step trajectory.
      digits   the digits benchmark's numbers (twinflow.study.metrics.digits_quality: accuracy,
               Fréchet distance, recall, within-prompt diversity against the real digits) of
               ``images_per_prompt`` images per digit prompt at each of ``nfe``; for models of the
               digits (the miniature paper, jobs/mini_paper.py), e.g. Tune's ``digits_frechet_1nfe``.
    Adding a kind: a value here and a branch in ``Worker.quality_probe`` (train/loop.py). A small
    GenEval subset would be such a kind (generate the subset's prompts at 1 NFE on rank 0, score them
    with evals/geneval); it is not implemented: GenEval's detector needs its own GPU environment.
    """

    kind: Literal["none", "nfe_gap", "digits"] = "none"
    reference_nfe: int = 16
    """nfe_gap: steps of the reference sample (Euler on the instantaneous velocity, r = t)."""
    nfe: list[int] = field(default_factory=lambda: [1])
    """digits: sampler steps scored (TwinFlow's few-step sampler); metrics ``digits_<name>_<n>nfe``."""
    images_per_prompt: int = 16
    """digits: images per prompt (every class × caption template of twinflow.data.digits)."""
    base_nfe: list[int] = field(default_factory=list)
    """digits: also score the starting model once (before any step, Euler on r = t) at these steps;
    reported in the run summary next to the final scores, e.g. [100, 1]."""

    def validate(self, path: str = "probe") -> None:
        require(self.reference_nfe >= 2, f"{path}.reference_nfe", f"must be >= 2, got {self.reference_nfe}")
        require(bool(self.nfe) and all(n >= 1 for n in self.nfe + self.base_nfe), f"{path}.nfe",
                "list step counts >= 1")
        require(self.images_per_prompt >= 2, f"{path}.images_per_prompt", "must be >= 2 (diversity needs pairs)")


@dataclass
class DebugSettings:
    """Fault injection, to rehearse recovery (tests, or a cluster before a long run)."""

    exit_at_step: int | None = None
    """Worker ``exit_rank`` exits abruptly right after finishing this optimizer step."""
    exit_in_checkpoint_at_step: int | None = None
    """Worker ``exit_rank`` exits after writing its shard of this step's checkpoint, before reporting it."""
    exit_rank: int = 1
    fault_marker_dir: str = ""
    """Local folder remembering which faults fired, so each fires once (required with exit faults)."""
    nan_at_steps: list[int] = field(default_factory=list)
    """Steps whose first micro-batch gets NaN latents on rank ``nan_rank`` (so its loss is NaN)."""
    nan_rank: int = 0

    def validate(self, path: str = "debug") -> None:
        exits = self.exit_at_step is not None or self.exit_in_checkpoint_at_step is not None
        require(not exits or bool(self.fault_marker_dir), f"{path}.fault_marker_dir",
                "set a local folder so that each injected exit fires only once")
        require(all(s >= 1 for s in self.nan_at_steps), f"{path}.nan_at_steps", "steps count from 1")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DatasetConfig = field(default_factory=DatasetConfig)
    encode: EncodeSettings = field(default_factory=EncodeSettings)
    method: Literal["twinflow", "meanflow", "scm", "dmd2", "vsd"] = "twinflow"
    """The objective trained: ``twinflow`` (the section below; its fm / rcgm presets included) or one of
    the paper's rivals, each configured by the section of its name: the JVP-free ``meanflow`` / ``scm``
    (method/meanflow.py), and ``dmd2`` / ``vsd``, which train a fake score beside the model (method/dmd.py,
    train/fake_score.py: LoRA mode keeps one base with a "fake" adapter, full mode a trained and a frozen copy)."""
    twinflow: TwinFlowConfig = field(default_factory=TwinFlowConfig)
    meanflow: MeanFlowConfig = field(default_factory=MeanFlowConfig)
    scm: SCMConfig = field(default_factory=SCMConfig)
    dmd2: DMDConfig = field(default_factory=dmd2)
    vsd: DMDConfig = field(default_factory=vsd)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    run: RunSettings = field(default_factory=RunSettings)
    sample: SampleSettings = field(default_factory=SampleSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    debug: DebugSettings = field(default_factory=DebugSettings)

    # ---- derived ---------------------------------------------------------------------------

    @property
    def layout(self) -> BatchLayout:
        return BatchLayout(self.deepspeed.micro_batch_per_gpu, self.scaling.num_workers,
                           self.deepspeed.gradient_accumulation)

    @property
    def precision(self) -> str:
        """bf16 or fp32, with auto resolved by the workers' device."""
        if self.deepspeed.precision != "auto":
            return self.deepspeed.precision
        return "bf16" if self.scaling.use_gpu else "fp32"

    @property
    def objective_config(self) -> TwinFlowConfig | MeanFlowConfig | SCMConfig | DMDConfig:
        return getattr(self, self.method)

    def block_weights(self) -> BlockWeights:
        """TwinFlow's block mix; the rivals' rows are all one kind (the near-diagonal slot, ids unused)."""
        return self.twinflow.weights() if self.method == "twinflow" else BlockWeights(0, 1, 0, 0)

    @property
    def is_lora(self) -> bool:
        return self.model.mode == "lora"

    # ---- cross-section rules ----------------------------------------------------------------

    def validate(self, path: str = "") -> None:
        ds, tf = self.deepspeed, self.twinflow
        try:
            block_counts(self.block_weights(), self.layout.global_batch)
        except ConfigError as exc:
            raise ConfigError(f"deepspeed.micro_batch_per_gpu: {exc} (now {ds.micro_batch_per_gpu} × "
                              f"{self.scaling.num_workers} workers × {ds.gradient_accumulation} accumulation)") from None
        if self.is_lora and tf.teacher == "ema":
            require(self.model.ema, "model.ema", "twinflow.teacher: ema on a LoRA model needs the 'ema' adapter; "
                                                 "set model.ema: true")
        if self.model.ema:
            require(tf.teacher == "ema", "model.ema", f"the 'ema' adapter is only used by twinflow.teacher: ema "
                                                      f"(teacher is {tf.teacher}); set model.ema: false")
        if self.method in ("dmd2", "vsd"):
            dmd = self.objective_config
            require(dmd.name == self.method, f"{self.method}.name",
                    f"the {self.method} section trains {self.method}; leave its name as {self.method!r} (got "
                    f"{dmd.name!r}; for the other weighting use method: {dmd.name})")
            # ZeRO-3 (full mode) gives the fake and real copies DeepSpeed engines of their own (train/fake_score.py).
            # In LoRA mode the fake score is a second adapter on the one base, trained outside DeepSpeed with whole
            # weights on every rank, which ZeRO-3 partitions away; the GAN head has no ZeRO-3 engine either.
            if ds.zero_stage == 3:
                require(self.model.mode == "full", "deepspeed.zero_stage",
                        f"method {self.method} in LoRA mode trains its fake adapter outside DeepSpeed and needs ZeRO-2 "
                        f"(got 3); use zero_stage: 2 (the base is frozen, so ZeRO-2 holds one base plus two adapters: "
                        f"about TwinFlow's memory), or model.mode: full for ZeRO-3")
                require(dmd.gan_weight == 0, f"{self.method}.gan_weight",
                        f"the GAN head trains beside the fake score outside DeepSpeed and needs ZeRO-2 (got "
                        f"zero_stage: 3); set {self.method}.gan_weight: 0 or deepspeed.zero_stage: 2")
        if ds.zero_stage == 3:
            # EMA / frozen teachers copy whole weights (a module copy, or an adapter the EMA update
            # reads in full); ZeRO-3 keeps only a partition per rank.
            require(tf.teacher == "self", "twinflow.teacher",
                    f"{tf.teacher} teachers need whole weights on every rank; with deepspeed.zero_stage: 3 use "
                    f"teacher: self (or ZeRO-2)")
        if self.precision == "fp32" and self.model.mode == "full":
            require(self.model.dtype == "float32", "model.dtype",
                    "full-parameter training in fp32 (deepspeed.precision) needs model.dtype: float32")
        if self.precision == "bf16" and self.model.mode == "full":
            require(self.model.dtype == "bfloat16", "model.dtype",
                    "full-parameter training in bf16 keeps bf16 weights (fp32 master copies in the optimizer); "
                    "set model.dtype: bfloat16")
        if self.probe.kind != "none":
            require(self.sample.enabled, "probe.kind", f"{self.probe.kind} scores the sample prompts × seeds; "
                                                       f"set sample.enabled: true (or probe.kind: none)")
        if self.model.path == TINY_MODEL:
            require(self.data.resolution <= 256, "data.resolution", "the tiny model is for small images; use <= 256")
        dbg = self.debug
        if dbg.exit_at_step is not None or dbg.exit_in_checkpoint_at_step is not None:
            require(dbg.exit_rank < self.scaling.num_workers, "debug.exit_rank",
                    f"must be < scaling.num_workers ({self.scaling.num_workers})")
        if dbg.nan_at_steps:
            require(dbg.nan_rank < self.scaling.num_workers, "debug.nan_rank",
                    f"must be < scaling.num_workers ({self.scaling.num_workers})")
