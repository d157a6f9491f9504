"""Data configs: DatasetConfig (the ``data`` section of every job that reads image-text data) and
the precache job's tree (PrecacheConfig = data + encode + output).

DatasetConfig describes where the data lives, in which layout, and how images become training
pixels; every ``validate(path)`` raises ``ConfigError("<path>.<field>: ...")`` before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from twinflow.config.errors import require

# Other names the same columns go by in the wild; tried, in order, when the configured name is
# missing from a parquet file. "image_bytes" is the TwinFlow reference's name (docs/METHOD.md §16).
IMAGE_COLUMN_ALIASES = ("image", "image_bytes", "jpg", "png", "img")
TEXT_COLUMN_ALIASES = ("text", "caption", "prompt", "txt")

# Skip reasons, counted per shard. Kept as constants so counts from different readers add up.
UNDECODABLE = "undecodable"       # bytes PIL cannot decode (truncated, not an image, bomb)
NO_IMAGE = "no_image"             # a caption without an image (webdataset / folder) or null bytes
NO_CAPTION = "no_caption"         # missing caption file / null text
EMPTY_CAPTION = "empty_caption"   # caption present but blank
TOO_SMALL = "too_small"           # shorter side below data.min_size
SKIP_REASONS = (UNDECODABLE, NO_IMAGE, NO_CAPTION, EMPTY_CAPTION, TOO_SMALL)

LATENT_CACHE = "latent_cache"
UNCOND_PROMPT = "Generate an image."  # TwinFlow's unconditional prompt (docs/DESIGN.md)
RAW_FORMATS = ("parquet", "webdataset", "folder")


@dataclass
class DatasetConfig:
    source: str = ""
    """Local path or ``s3://bucket/prefix``: a folder of shards, one shard file, or a latent cache
    written by jobs/precache.py. S3 endpoint/keys come from AWS_* variables (twinflow.data.fs)."""
    format: Literal["auto", "parquet", "webdataset", "folder", "latent_cache"] = "auto"
    """auto: a manifest.json -> latent_cache; *.parquet -> parquet; *.tar -> webdataset; images -> folder."""

    # --- parquet ---------------------------------------------------------------------------
    image_column: str = "image"
    """Column of encoded image bytes (binary, or an HF-style struct with a ``bytes`` field).
    When absent from a file, the aliases image/image_bytes/jpg/png/img are tried."""
    text_column: str = "text"
    """Caption column; when absent, text/caption/prompt/txt are tried."""

    # --- webdataset and folder ---------------------------------------------------------------
    image_extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp")
    caption_extensions: tuple[str, ...] = ("txt", "json")
    """A ``.txt`` file is the caption; a ``.json`` file holds it under ``caption_json_field``."""
    caption_json_field: str = "caption"
    files_per_shard: int = 1000
    """folder format: images per shard (shards are consecutive runs of the sorted file list)."""

    # --- image preprocessing (docs/METHOD.md §16: 512², centre crop, [-1, 1]) ----------------
    resolution: int = 512
    """Square side for crop=center; the target area is resolution² for crop=buckets."""
    crop: Literal["center", "buckets"] = "center"
    """center: resize the shorter side to ``resolution`` and centre-crop a square.
    buckets: resize+crop to the aspect-ratio bucket closest to the image (same area, sides
    multiples of 16 so VAE /8 + 2×2 patches divide them); batches hold one bucket each."""
    bucket_max_aspect: float = 2.0
    """buckets: the widest and tallest bucket (long side / short side)."""
    min_size: int = 64
    """Images whose shorter side is below this are skipped as too_small (0 keeps everything)."""

    # --- bad data -------------------------------------------------------------------------
    bad_share_limit: float = 0.05
    """A shard whose skipped share exceeds this stops the job with a message naming it."""

    # --- epochs after the first (latent caches) ----------------------------------------------
    memory_epochs: Literal["auto", "on", "off"] = "auto"
    """Epoch 1 streams through Ray Data; later epochs replay this rank's rows from memory in a new
    seeded order each epoch (no re-reading, and a shuffle, which plain streaming lacks). auto: on for
    a latent cache whose rows take at most ``memory_epochs_max_gib`` per rank (small data sets, where
    restarting the stream every few steps would cost more than the training)."""
    memory_epochs_max_gib: float = 1.0

    # --- Ray Data decode stage ---------------------------------------------------------------
    decode_batch_rows: int = 64
    """Rows per block yielded by a shard-decode task (memory per in-flight block)."""
    decode_num_cpus: float = 1.0
    decode_resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources per decode task, e.g. {twinflow_data: 1} on clusters with CPU data nodes."""

    @property
    def is_cached(self) -> bool:
        return self.format == LATENT_CACHE

    def validate(self, path: str = "data") -> None:
        p = path or "data"
        require(bool(self.source), f"{p}.source", "set it to a local path or s3://bucket/prefix of the data")
        require(self.resolution >= 16 and self.resolution % 16 == 0, f"{p}.resolution",
                f"must be a positive multiple of 16 (VAE /8 and 2x2 patches), got {self.resolution}")
        require(self.min_size >= 0, f"{p}.min_size", f"must be >= 0, got {self.min_size}")
        require(0.0 <= self.bad_share_limit <= 1.0, f"{p}.bad_share_limit",
                f"must be a share in [0, 1], got {self.bad_share_limit}")
        require(self.bucket_max_aspect >= 1.0, f"{p}.bucket_max_aspect",
                f"must be >= 1 (long side / short side), got {self.bucket_max_aspect}")
        require(self.files_per_shard >= 1, f"{p}.files_per_shard", "must be >= 1")
        require(self.decode_batch_rows >= 1, f"{p}.decode_batch_rows", "must be >= 1")
        require(self.decode_num_cpus > 0, f"{p}.decode_num_cpus",
                "must be > 0 (use a fraction such as 0.5 to pack decode tasks)")
        require(bool(self.image_column) and bool(self.text_column), f"{p}.image_column",
                "column names must be non-empty")
        require(bool(self.image_extensions), f"{p}.image_extensions", "list at least one extension, e.g. [jpg, png]")
        require(bool(self.caption_extensions), f"{p}.caption_extensions", "list at least one extension, e.g. [txt]")
        for ext in (*self.image_extensions, *self.caption_extensions):
            require(not ext.startswith("."), f"{p}.image_extensions", f"write extensions without the dot: {ext!r}")
        for name, amount in self.decode_resources.items():
            require(amount > 0, f"{p}.decode_resources.{name}", f"must be > 0, got {amount}")


# ----------------------------------------------------------------------------- precache job


@dataclass
class EncodeConfig:
    model_path: str = ""
    """Qwen-Image pipeline folder (diffusers layout) or hub id; only vae/text_encoder/tokenizer load.
    "tiny" builds the random-weight test model (twinflow.models.tiny_qwen) in ~/.cache/twinflow."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype of the encoders; auto = bf16 on GPU, fp32 on CPU."""
    batch_size: int = 16
    """Rows per encode call of an actor."""
    concurrency: int = 1
    """Encode actors (one model copy each)."""
    num_gpus: float | None = None
    """GPUs per actor; None = 1 when the cluster has GPUs, else 0."""
    num_cpus: float = 1.0
    resources: dict[str, float] = field(default_factory=dict)
    max_sequence_length: int = 512
    uncond_prompt: str | None = None
    """The unconditional prompt ∅ cached beside the rows; None: the model family's (Qwen-Image:
    "Generate an image.", SANA: "")."""

    def validate(self, path: str = "encode") -> None:
        require(bool(self.model_path), f"{path}.model_path", "set the Qwen-Image folder (or 'tiny' for the test model)")
        require(self.batch_size >= 1, f"{path}.batch_size", "must be >= 1")
        require(self.concurrency >= 1, f"{path}.concurrency", "must be >= 1 (number of encode actors)")
        require(self.num_gpus is None or self.num_gpus >= 0, f"{path}.num_gpus", "must be >= 0 or null (auto)")
        require(self.num_cpus > 0, f"{path}.num_cpus", "must be > 0")
        require(1 <= self.max_sequence_length <= 1024, f"{path}.max_sequence_length",
                "must be in [1, 1024] (QwenImagePipeline's limit)")


@dataclass
class PrecacheConfig:
    data: DatasetConfig = field(default_factory=DatasetConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    output: str = ""
    """Cache prefix, local or s3://bucket/prefix. Re-running on it resumes."""
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of latents and embeddings (training always receives float32)."""
    part_rows: int = 256
    """Rows per write task; a part file holds one shard's rows of it."""
    write_num_cpus: float = 0.25
    overwrite: bool = False
    """Wipe an output made with other settings (otherwise that is an error)."""

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        require(bool(self.output), f"{p}output", "set the cache prefix (local path or s3://bucket/prefix)")
        require(self.data.format != LATENT_CACHE, f"{p}data.format", "precache reads raw data, not a latent cache")
        require(self.output.rstrip("/") != self.data.source.rstrip("/"), f"{p}output",
                "must differ from data.source")
        require(self.part_rows >= 1, f"{p}part_rows", "must be >= 1")
        require(self.write_num_cpus > 0, f"{p}write_num_cpus", "must be > 0")
