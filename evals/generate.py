"""The generation stage: a pipeline folder -> benchmark images at each NFE, on Ray actors.

Generator protocol (what the stage needs from a model)::

    gen = load_generator(folder, kind, device, options)
    images = gen(prompts, seeds, nfe, (height, width))   # list[PIL.Image], one per prompt/seed pair

Implementations:
  ``twinflow``   the folder's family's TwinFlow pipeline (``TwinFlowQwenImagePipeline``,
                 ``TwinFlowSanaPipeline``; twinflow.models.families, imported lazily: the TwinFlow any-step
                 sampler; ``num_inference_steps`` is the NFE)
  ``diffusers``  diffusers' own pipeline (``QwenImagePipeline``, ``SanaPipeline`` or whatever
                 ``DiffusionPipeline`` the folder names), same call shape; used for base models and for tests
                 on tiny random folders
  ``auto``       ``twinflow`` when the folder's model_index.json names a TwinFlow pipeline, else ``diffusers``
Each image gets its own CPU ``torch.Generator`` seeded from (seed, benchmark, prompt key, image
index): the noise is identical on CPU and GPU, for every shard layout, and at every NFE.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from PIL import Image

from evals import layout
from evals.prompts import Item

TWINFLOW_PREFIX = "TwinFlow"
"""The TwinFlow pipelines of every family are named TwinFlow<diffusers pipeline name>."""


def image_seed(base: int, benchmark: str, key: str, index: int) -> int:
    digest = hashlib.sha256(f"{base}|{benchmark}|{key}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class Generator(Protocol):
    name: str

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], nfe: int,
                 size: tuple[int, int]) -> list[Image.Image]: ...


@dataclass
class GenerationOptions:
    dtype: str = "auto"
    true_cfg_scale: float = 1.0
    negative_prompt: str = " "
    max_sequence_length: int = 0
    extra_call_kwargs: dict[str, Any] = field(default_factory=dict)

    def call_kwargs(self, kind: str = "diffusers") -> dict[str, Any]:
        kw: dict[str, Any] = dict(self.extra_call_kwargs)
        if self.true_cfg_scale > 1:  # Qwen-Image's true CFG needs a negative prompt to activate
            kw.update(true_cfg_scale=self.true_cfg_scale, negative_prompt=self.negative_prompt)
        elif kind == "diffusers":
            # QwenImagePipeline defaults to true_cfg_scale=4.0 (inactive without a negative prompt,
            # but it warns on every call); say "no CFG" explicitly.
            kw["true_cfg_scale"] = self.true_cfg_scale
        if self.max_sequence_length:
            kw["max_sequence_length"] = self.max_sequence_length
        return kw


def pipeline_class_name(folder: str | Path) -> str:
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    return str(json.loads(index.read_text()).get("_class_name", ""))


class PipelineGenerator:
    """Any diffusers-style pipeline called with prompt/height/width/num_inference_steps/generator."""

    def __init__(self, pipe: Any, name: str, device: str, options: GenerationOptions, kind: str = "diffusers"):
        self.pipe = pipe
        self.kind = kind
        self.name = name
        self.device = device
        self.options = options

    def __call__(self, prompts, seeds, nfe, size):
        import torch

        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        out = self.pipe(prompt=list(prompts), height=int(size[0]), width=int(size[1]), num_inference_steps=int(nfe),
                        generator=gens, output_type="pil", **self.options.call_kwargs(self.kind))
        return list(out.images)


def _dtype(name: str, device: str):
    from twinflow.dtypes import torch_dtype

    return torch_dtype(name, device)


def resolve_kind(folder: str | Path, kind: str = "auto") -> str:
    """``auto`` -> ``twinflow`` for a folder of a TwinFlow pipeline (any family), else ``diffusers``."""
    if kind == "auto":
        return "twinflow" if (pipeline_class_name(folder) or "").startswith(TWINFLOW_PREFIX) else "diffusers"
    if kind not in ("twinflow", "diffusers"):
        raise ValueError(f"unknown generator {kind!r}; choose auto, twinflow or diffusers")
    return kind


def load_generator(folder: str | Path, kind: str = "auto", device: str = "cpu",
                   options: GenerationOptions | None = None) -> PipelineGenerator:
    options = options or GenerationOptions()
    class_name = pipeline_class_name(folder)
    kind = resolve_kind(folder, kind)
    dtype = _dtype(options.dtype, device)
    if kind == "twinflow":
        try:
            from twinflow.models.families import backbone_for
        except ImportError as exc:
            raise ImportError("generation.generator=twinflow needs the twinflow package (twinflow.models.families), "
                              f"which this install lacks ({exc}); use generation.generator=diffusers") from exc
        pipe = backbone_for(str(folder)).pipeline_class().from_pretrained(str(folder), dtype=dtype)
    else:
        import diffusers

        cls = getattr(diffusers, class_name, None) or diffusers.DiffusionPipeline
        pipe = cls.from_pretrained(str(folder), dtype=dtype)
    pipe = pipe.to(device)
    if getattr(pipe, "text_encoder", None) is not None and "Qwen" in type(pipe.text_encoder).__name__:
        from twinflow.models.qwen_encode import skip_unused_logits

        skip_unused_logits(pipe.text_encoder)  # a stock QwenImagePipeline computes 152k-vocab logits per token
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return PipelineGenerator(pipe, f"{kind}:{type(pipe).__name__}", device, options, kind)


@dataclass
class GenTask:
    """One prompt to render: ``count`` images of ``size`` at ``nfe`` steps with the given seeds."""

    benchmark: str
    nfe: int
    item: Item
    seeds: list[int]
    size: tuple[int, int]

    @property
    def uid(self) -> str:
        return f"{self.benchmark}/{self.nfe}/{self.item.key}"


class GenerationActor:
    """Loads the pipeline once; ``process(tasks)`` renders and returns files as bytes per task.

    A failing batch is retried prompt by prompt so one bad prompt costs only itself; each task
    yields a record with status "generated" or "failed" (and the error), never silence.
    """

    def __init__(self, folder: str, kind: str, device: str, options: GenerationOptions, batch_size: int = 4,
                 num_threads: int = 0):
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.generator = load_generator(folder, kind, device, options)
        self.batch_size = batch_size

    def ready(self) -> str:
        return self.generator.name

    def _render(self, tasks: list[GenTask]) -> list[list[Image.Image]]:
        flat = [(ti, t.item.prompt, s) for ti, t in enumerate(tasks) for s in t.seeds]
        images: list[list[Image.Image]] = [[] for _ in tasks]
        nfe, size = tasks[0].nfe, tasks[0].size
        for i in range(0, len(flat), self.batch_size):
            chunk = flat[i:i + self.batch_size]
            outs = self.generator([p for _, p, _ in chunk], [s for _, _, s in chunk], nfe, size)
            for (ti, _, _), im in zip(chunk, outs):
                images[ti].append(im)
        return images

    def process(self, tasks: list[GenTask]) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        groups: dict[tuple, list[GenTask]] = {}
        for t in tasks:  # one pipeline call shape per (nfe, size)
            groups.setdefault((t.nfe, t.size), []).append(t)
        for group in groups.values():
            t0 = time.time()
            try:
                rendered = self._render(group)
                per = [(t, ims, None) for t, ims in zip(group, rendered)]
            except Exception:  # retry one prompt at a time to isolate the bad one
                per = []
                for t in group:
                    try:
                        per.append((t, self._render([t])[0], None))
                    except Exception as exc:  # noqa: BLE001 - recorded per prompt
                        per.append((t, None, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"))
            dt = (time.time() - t0) / max(1, len(group))
            for t, ims, err in per:
                rec = {"benchmark": t.benchmark, "nfe": t.nfe, "key": t.item.key, "seconds": round(dt, 3)}
                if err is None and len(ims) == len(t.seeds):
                    rec.update(status="generated", files=layout.render(t.benchmark, t.item, ims))
                else:
                    rec.update(status="failed", error=err or f"pipeline returned {len(ims)} of {len(t.seeds)} images")
                records.append(rec)
        return records
