"""The typed config tree of ``jobs/evaluate.py`` and its presets.

YAML + ``--set a.b=c`` + ``--dry-run`` via ``twinflow.config``; ``validate`` methods raise
``ConfigError`` naming the dotted field. Presets:
  default  the real scorer models (GPU pool when the cluster has GPUs, CPU otherwise)
  tiny     random-weight tiny models built locally (Qwen-Image, Mask2Former, CLIP, BLIP, Qwen2.5-VL),
           CPU actors: exercises every stage end to end in about a minute on a laptop
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from twinflow import ray_resources
from twinflow.config import require

from evals.prompts import BENCHMARKS, FILE_BENCHMARKS


@dataclass
class GenerationConfig:
    """How images are made. The seed of image k of prompt p is a hash of (seed, benchmark, p, k):
    independent of sharding, and the same at every NFE, so NFE columns compare like with like."""

    generator: Literal["auto", "twinflow", "diffusers"] = "auto"
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    true_cfg_scale: float = 1.0          # >1 enables Qwen-Image's true CFG with negative_prompt
    negative_prompt: str = " "
    max_sequence_length: int = 0         # 0 = the pipeline's default
    extra_call_kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        require(self.true_cfg_scale >= 0, f"{path}.true_cfg_scale", "must be >= 0 (1 disables CFG)")
        require(self.max_sequence_length >= 0, f"{path}.max_sequence_length", "must be >= 0 (0 = default)")


@dataclass
class GenEvalConfig:
    images_per_prompt: int = 4
    resolution: int = 1024
    detector: str = "facebook/mask2former-swin-small-coco-instance"
    clip: str = "openai/clip-vit-large-patch14"
    class_mapping: Literal["by_name", "by_index"] = "by_name"
    detector_short_edge: int = 800       # mmdet's test resize: shorter side 800, longer <= 1333
    detector_long_edge: int = 1333
    detector_batch_size: int = 4
    # The official evaluator constants (a change marks the report "non-official rules").
    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    nms_threshold: float = 1.0
    position_threshold: float = 0.1

    def validate(self, path: str) -> None:
        require(self.images_per_prompt >= 1, f"{path}.images_per_prompt", "must be >= 1 (the convention is 4)")
        require(self.resolution >= 16 and self.resolution % 16 == 0, f"{path}.resolution",
                "must be a multiple of 16 (VAE /8 and 2x2 patches)")
        require(0 <= self.threshold < 1 and 0 <= self.counting_threshold < 1, f"{path}.threshold",
                "thresholds must lie in [0, 1)")


@dataclass
class DPGConfig:
    questions_csv: str = ""              # path or http(s) URL of dpg_bench.csv (not in shared/)
    questions_blob: str = "98457fc9901943f51ff9a30367250fc292533bed"  # git blob of the official CSV; "" skips
    mode: Literal["official", "fixed"] = "official"
    tile_resolution: int = 1024          # one tile; the saved grid is 2R x 2R
    vqa: Literal["blip", "qwen_vl"] = "blip"
    vqa_model: str = ""                  # "" = the backend's default model
    vqa_batch_size: int = 32

    def validate(self, path: str) -> None:
        require(self.tile_resolution >= 16 and self.tile_resolution % 16 == 0, f"{path}.tile_resolution",
                "must be a multiple of 16")
        require(self.vqa_batch_size >= 1, f"{path}.vqa_batch_size", "must be >= 1")


@dataclass
class WISEConfig:
    protocol: Literal["legacy", "verified"] = "legacy"
    rewrite: bool = False                # legacy *_rewrite.json prompts (the paper's rewrite analysis)
    resolution: int = 1024
    judge: Literal["api", "local"] = "api"
    api_base_url: str = ""               # "" = $OPENAI_BASE_URL, else https://api.openai.com/v1
    api_model: str = ""                  # "" = the protocol's official judge
    api_key_env: str = "OPENAI_API_KEY"  # the *name* of the env var holding the key
    api_extra_body: dict[str, Any] = field(default_factory=dict)
    local_model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    local_reply: Literal["free", "constrained"] = "free"
    """Local judge: free generation (parsed, retried, skipped when unparseable), or constrained:
    the reply template is written for the model and it only picks each grade (its most likely
    allowed digit), so every reply parses; for small open judges that drift off the format."""
    prompt_file: str = ""                # JSON {"system", "user"} with the official wording; "" = paraphrase
    max_attempts: int = 3
    max_workers: int = 8                 # concurrent judge calls per actor (API judge)
    timeout_s: float = 120.0
    max_tokens: int = 0                  # 0 = protocol default (2000 legacy, 500 verified)

    def validate(self, path: str) -> None:
        require(self.max_attempts >= 1, f"{path}.max_attempts", "must be >= 1 (official: 3)")
        require(self.max_workers >= 1, f"{path}.max_workers", "must be >= 1")
        require(not (self.rewrite and self.protocol == "verified"), f"{path}.rewrite",
                "WISE_Verified has no rewrite prompts; set wise.rewrite=false")


@dataclass
class DigitsConfig:
    """The digits benchmark (evals/digits): the miniature paper's digits base."""

    images_per_prompt: int = 32
    templates: int = 2                   # caption templates per class (twinflow.data.digits)
    resolution: int = 32
    threshold: float = 0.5               # classifier probability for an image to count as correct
    k: int = 3                           # k-NN precision / recall
    feature_dims: int = 32               # PCA features for Fréchet / precision / recall / diversity

    def validate(self, path: str) -> None:
        require(self.images_per_prompt >= 2, f"{path}.images_per_prompt",
                "must be >= 2 (within-prompt diversity needs pairs)")
        require(1 <= self.templates <= 2, f"{path}.templates", "must be 1 or 2")
        require(self.resolution >= 16 and self.resolution % 16 == 0, f"{path}.resolution", "must be a multiple of 16")
        require(0 <= self.threshold < 1, f"{path}.threshold", "must lie in [0, 1)")
        require(self.k >= 1 and 2 <= self.feature_dims <= 64, f"{path}", "k >= 1 and 2 <= feature_dims <= 64")

    def rules(self):
        from evals.digits.rules import DigitsRules

        return DigitsRules(threshold=self.threshold, k=self.k, feature_dims=self.feature_dims, size=self.resolution)


@dataclass
class StageConfig:
    """Resources of one stage's actors. ``num_gpus`` applies only when the pool runs on GPUs."""

    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 1.0
    shard_size: int = 8                  # prompts per shard (the retry unit)
    batch_size: int = 4                  # images per forward pass (generation stage)
    runtime_env: dict[str, Any] = field(default_factory=dict)  # e.g. a container or pip env per scorer

    def validate(self, path: str) -> None:
        require(self.num_actors >= 1, f"{path}.num_actors", "must be >= 1")
        require(self.num_cpus >= 0 and self.num_gpus >= 0, f"{path}", "num_cpus and num_gpus must be >= 0")
        require(self.shard_size >= 1 and self.batch_size >= 1, f"{path}", "shard_size and batch_size must be >= 1")


@dataclass
class PoolConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"   # auto = cuda when the cluster has GPUs
    eval_resource: str = ray_resources.EVAL           # custom resource GPU actors request; "" = none
    ray_address: str = ""                             # "" = connect to a running cluster or start one
    max_attempts: int = 3                             # tries per shard (actor deaths and task errors)
    shard_timeout_s: float = 0.0                      # >0: a shard running longer kills its actor
    concurrent_scoring: bool = True                   # run the benchmarks' scorer stages side by side
    generate: StageConfig = field(default_factory=StageConfig)
    geneval: StageConfig = field(default_factory=StageConfig)
    dpg: StageConfig = field(default_factory=StageConfig)
    wise: StageConfig = field(default_factory=lambda: StageConfig(num_gpus=0.0))
    digits: StageConfig = field(default_factory=lambda: StageConfig(num_gpus=0.0, shard_size=4))

    def validate(self, path: str) -> None:
        require(self.max_attempts >= 1, f"{path}.max_attempts", "must be >= 1")


@dataclass
class WatchConfig:
    poll_s: float = 60.0
    settle_s: float = 30.0               # a checkpoint is ready once unchanged for this long
    max_checkpoints: int = 0             # stop after this many evaluations (0 = run until stopped)
    exit_when_idle: bool = False         # stop once no new checkpoint is waiting (tests, cron)


@dataclass
class EvalConfig:
    checkpoint: str = ""                 # diffusers folder, or a training checkpoint dir holding one
    watch_dir: str = ""                  # run storage path to watch for new checkpoints
    output_dir: str = ""                 # "" = <checkpoint>/eval
    data_root: str = ""                  # "" = $TWINFLOW_BENCHMARKS_DIR, else ./shared/benchmarks
    benchmarks: list[str] = field(default_factory=lambda: list(FILE_BENCHMARKS))
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4])
    limit: int = 0                       # first N prompts of each benchmark (0 = all)
    resume: bool = True                  # keep images and records already written
    retry_failed: bool = True            # on resume, score failed/skipped items again
    grid_prompts: int = 6                # columns of the per-benchmark image grid
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    geneval: GenEvalConfig = field(default_factory=GenEvalConfig)
    dpg: DPGConfig = field(default_factory=DPGConfig)
    wise: WISEConfig = field(default_factory=WISEConfig)
    digits: DigitsConfig = field(default_factory=DigitsConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)

    def validate(self, path: str = "") -> None:
        p = (path + ".") if path else ""
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        require(not unknown, f"{p}benchmarks", f"unknown {unknown}; choose from {', '.join(BENCHMARKS)}")
        require(bool(self.benchmarks), f"{p}benchmarks", "name at least one benchmark")
        require(len(set(self.benchmarks)) == len(self.benchmarks), f"{p}benchmarks", "lists a benchmark twice")
        require(bool(self.nfe) and all(n >= 1 for n in self.nfe), f"{p}nfe", "must be a non-empty list of steps >= 1")
        require(len(set(self.nfe)) == len(self.nfe), f"{p}nfe", "lists an NFE twice")
        require(self.limit >= 0, f"{p}limit", "must be >= 0 (0 = all prompts)")
        require(bool(self.checkpoint) != bool(self.watch_dir), f"{p}checkpoint",
                "give exactly one of --checkpoint PATH or --watch RUN_STORAGE_PATH")
        require(not (self.watch_dir and self.output_dir), f"{p}output_dir",
                "with --watch each checkpoint writes to <checkpoint>/eval; leave output_dir empty")
        require("dpg" not in self.benchmarks or bool(self.dpg.questions_csv), f"{p}dpg.questions_csv",
                "DPG-Bench needs its question CSV: --set dpg.questions_csv=PATH_OR_URL (see prompts.DPG_CSV_URL)")


def default() -> EvalConfig:
    return EvalConfig()


TINY_DIR = "runs/tiny-evals"


def tiny() -> EvalConfig:
    """Everything tiny and on CPU: ``tiny`` / ``tiny:<kind>`` name random-weight models that are built
    once into $TWINFLOW_CACHE (evals/tiny_models.py); results go to runs/tiny-evals/."""
    cfg = EvalConfig(checkpoint="tiny", output_dir=TINY_DIR, benchmarks=["geneval", "wise"], nfe=[1, 2], limit=4)
    cfg.geneval = GenEvalConfig(images_per_prompt=2, resolution=64, detector="tiny:mask2former", clip="tiny:clip",
                                detector_short_edge=64, detector_long_edge=107)
    cfg.dpg = DPGConfig(tile_resolution=32, vqa_model="tiny:blip", questions_blob="")
    cfg.wise = WISEConfig(resolution=64, judge="local", local_model="tiny:qwen-vl", max_attempts=1,
                          local_reply="constrained")
    cfg.generation = GenerationConfig(max_sequence_length=32)
    small = dict(num_actors=1, num_cpus=1.0, num_gpus=0.0, shard_size=4, batch_size=4)
    cfg.pool = PoolConfig(device="cpu", generate=StageConfig(**small), geneval=StageConfig(**small),
                          dpg=StageConfig(**small), wise=StageConfig(**small))
    return cfg


def digits() -> EvalConfig:
    """The digits benchmark on CPU actors, for the miniature paper's models: by default the pretrained
    digits base itself (``digits-base``, built on first use) at 1, 2, 4 and 100 NFE."""
    cfg = EvalConfig(checkpoint="digits-base", benchmarks=["digits"], nfe=[1, 2, 4, 100], grid_prompts=10,
                     generation=GenerationConfig(max_sequence_length=64))
    stage = dict(num_actors=1, num_cpus=1.0, num_gpus=0.0, shard_size=4, batch_size=64)
    cfg.pool = PoolConfig(device="cpu", generate=StageConfig(**stage), digits=StageConfig(**stage),
                          geneval=StageConfig(**stage), dpg=StageConfig(**stage), wise=StageConfig(**stage))
    return cfg


PRESETS = {"default": default, "tiny": tiny, "digits": digits}
