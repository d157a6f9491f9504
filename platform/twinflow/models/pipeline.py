"""``TwinFlowQwenImagePipeline``: a diffusers pipeline that generates with TwinFlow's any-step sampler.

    pipe = TwinFlowQwenImagePipeline.from_pretrained(folder)          # export, or a plain Qwen-Image
    out = pipe(prompt=["a red cat"], height=1024, width=1024, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0))            # out.images: list of PIL
    pipe.save_pretrained(other_folder)                                # round-trips

It is a ``QwenImagePipeline`` subclass (so prompt encoding, the VAE image processor, LoRA loading
and offload hooks are diffusers' own) whose transformer is ``TwinFlowQwenImageTransformer2DModel``
and whose ``__call__`` runs ``twinflow.method.sampler.sample`` — guidance 0 (TwinFlow distils CFG
into the weights), no scheduler shift. The scheduler component is kept only so the folder stays
a valid Qwen-Image folder.

Sampler settings live in the folder: ``model_index.json`` carries ``sampler_presets`` (NFE →
SamplerConfig fields) and ``default_steps``; the export job writes them with
``set_sampler_presets`` and users get the right grid for ``num_inference_steps`` by default.
Steps without a preset use the released few-step rule (``sampler.few_step``).

How diffusers finds our transformer class: ``save_pretrained`` records a component from outside
diffusers/transformers under its full module path, here
``["twinflow.models.qwen_image", "TwinFlowQwenImageTransformer2DModel"]``; ``from_pretrained``
resolves such a name only from ``sys.modules`` (it never imports code a folder names), and this
module imports it, so loading through this class always works.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from twinflow.config.tree import from_dict, to_dict
from twinflow.method.sampler import DEFAULT_STEPS, PRESET_STEPS, SamplerConfig, few_step, method_sampler, sample
from twinflow.models.qwen_encode import decode_latents
from twinflow.models.qwen_image import TwinFlowQwenImageTransformer2DModel
from twinflow.models.qwen_velocity import QwenImageVelocity

logger = logging.getLogger(__name__)

def default_sampler_presets(steps=PRESET_STEPS, method: str = "twinflow") -> dict[str, dict]:
    """The grids for each NFE in ``steps`` a model trained with ``method`` samples with
    (``sampler.method_sampler``): for TwinFlow the released few-step grids, 1/2/4 as released for Qwen-Image."""
    return {str(k): to_dict(method_sampler(method, k)) for k in sorted(set(steps))}


def _presets_to_json(presets: dict[Any, SamplerConfig | dict]) -> dict[str, dict]:
    out = {}
    for steps, cfg in presets.items():
        cfg = cfg if isinstance(cfg, SamplerConfig) else from_dict(SamplerConfig, cfg, f"sampler_presets.{steps}")
        cfg.validate(f"sampler_presets.{steps}")
        if cfg.steps != int(steps):
            raise ValueError(f"sampler_presets.{steps}: preset has steps={cfg.steps}, expected {steps}")
        out[str(int(steps))] = to_dict(cfg)
    return out


class TwinFlowPipelineMixin:
    """What every family's TwinFlow pipeline shares (Qwen-Image below, SANA in models/sana.py): the sampler
    table in the folder's config, loading a plain folder of the family, and the sampling loop over the
    family's velocity. A pipeline class sets ``TRANSFORMER_CLASS`` and calls ``_register_sampler`` in
    ``__init__``."""

    TRANSFORMER_CLASS: type = None

    def _register_sampler(self, sampler_presets: dict | None, default_steps: int) -> None:
        self.register_to_config(sampler_presets=_presets_to_json(sampler_presets or default_sampler_presets()),
                                default_steps=int(default_steps))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a TwinFlow folder, or a plain one of the family (its transformer gets E2 copied from E1)."""
        if "transformer" not in kwargs:
            hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
            index = cls.load_config(pretrained_model_name_or_path, **hub)
            entry = index.get("transformer") or (None, None)
            target = cls.TRANSFORMER_CLASS
            if entry[1] != target.__name__:
                dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
                if isinstance(dtype, dict):
                    dtype = dtype.get("transformer", dtype.get("default"))
                logger.info("%s holds a plain %s; loading it as %s", pretrained_model_name_or_path, entry[1],
                            target.__name__)
                kwargs["transformer"] = target.from_pretrained(pretrained_model_name_or_path, subfolder="transformer",
                                                               dtype=dtype, **hub)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ---- sampler settings -------------------------------------------------------------------

    def set_sampler_presets(self, presets: dict[Any, SamplerConfig | dict], default_steps: int | None = None) -> None:
        """Replace the NFE → sampler table (and optionally the default NFE); saved with the pipeline."""
        table = _presets_to_json(presets)
        steps = int(default_steps if default_steps is not None else self.config.default_steps)
        self.register_to_config(sampler_presets=table, default_steps=steps)

    def sampler_for(self, num_inference_steps: int | None = None) -> SamplerConfig:
        """The sampler used for ``num_inference_steps`` NFE (None: ``default_steps``)."""
        steps = int(num_inference_steps or self.config.default_steps)
        preset = (self.config.sampler_presets or {}).get(str(steps))
        cfg = from_dict(SamplerConfig, preset, f"sampler_presets.{steps}") if preset else few_step(steps)
        cfg.validate("sampler")
        return cfg

    def _resolve_sampler(self, num_inference_steps: int | None, sampler: SamplerConfig | None) -> SamplerConfig:
        if sampler is None:
            return self.sampler_for(num_inference_steps)
        if num_inference_steps is not None and num_inference_steps != sampler.steps:
            raise ValueError(f"num_inference_steps={num_inference_steps} disagrees with sampler.steps="
                             f"{sampler.steps}; pass one of them")
        sampler.validate("sampler")
        return sampler

    def _noise(self, shape: tuple, latents: torch.Tensor | None, generator, device) -> torch.Tensor:
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=torch.float32)

    def _sample(self, velocity, noise: torch.Tensor, cond: dict, cfg: SamplerConfig, generator, device) -> torch.Tensor:
        """TwinFlow's any-step sampler from ``noise``; ``generator`` one or one per image (as in diffusers)."""
        if isinstance(generator, list):
            if len(generator) != noise.shape[0]:
                raise ValueError(f"got {len(generator)} generators for {noise.shape[0]} images")
            sampler_gen = [_on_device(g, device) for g in generator]
        else:
            sampler_gen = _on_device(generator, device)
        return sample(velocity, noise, cond, cfg, generator=sampler_gen, model_dtype=velocity.compute_dtype)


class TwinFlowQwenImagePipeline(TwinFlowPipelineMixin, QwenImagePipeline):
    r"""Text-to-image with a TwinFlow Qwen-Image transformer at 1/2/4/N NFE.

    Components: transformer (``TwinFlowQwenImageTransformer2DModel``), vae, text_encoder,
    tokenizer, scheduler (kept for folder compatibility, unused). Config: ``sampler_presets``
    {"<nfe>": SamplerConfig fields}, ``default_steps``.
    """

    TRANSFORMER_CLASS = TwinFlowQwenImageTransformer2DModel

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler, vae: AutoencoderKLQwenImage, text_encoder,
                 tokenizer, transformer: TwinFlowQwenImageTransformer2DModel,
                 sampler_presets: dict | None = None, default_steps: int = DEFAULT_STEPS):
        from twinflow.models.qwen_encode import skip_unused_logits

        super().__init__(scheduler=scheduler, vae=vae, text_encoder=skip_unused_logits(text_encoder),
                         tokenizer=tokenizer, transformer=transformer)
        self._register_sampler(sampler_presets, default_steps)

    @classmethod
    def from_qwen_image(cls, pretrained_model_name_or_path, **kwargs):
        """Alias that says what it is for: build from a plain ``QwenImagePipeline`` folder or hub id."""
        return cls.from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ---- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 sampler: SamplerConfig | None = None,
                 num_images_per_prompt: int = 1, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, prompt_embeds_mask: torch.Tensor | None = None,
                 max_sequence_length: int = 512, output_type: str = "pil", return_dict: bool = True):
        """Generate images.

        num_inference_steps  NFE (1, 2, 4, …); None uses ``default_steps``. The grid comes from the
                             folder's ``sampler_presets`` unless ``sampler`` is given.
        generator            a ``torch.Generator`` (CPU or on the device) fixing the noise and the
                             sampler's re-noising, or one per image (as in diffusers) so that each
                             image depends on its own seed only, whatever batch it is made in.
        latents              optional starting noise, normalised-latent layout [B, C, h, w].
        output_type          "pil", "np", "pt" ([B, 3, H, W] in [0, 1]) or "latent" (the normalised
                             latents [B, C, h, w], unpacked — unlike QwenImagePipeline's packed ones).
        """
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_embeds_mask,
                          max_sequence_length=max_sequence_length)
        cfg = self._resolve_sampler(num_inference_steps, sampler)

        device = self._execution_device
        # Repeat per image here, not in encode_prompt: diffusers 0.42.1 repeats a 2-D mask with
        # repeat(1, n, 1), which tiles the whole batch ([m0, m1, m0, m1]) while the embeddings are
        # interleaved ([p0, p0, p1, p1]), pairing prompts with the wrong padding masks.
        embeds, mask = self.encode_prompt(prompt=prompt, prompt_embeds=prompt_embeds,
                                          prompt_embeds_mask=prompt_embeds_mask, device=device,
                                          num_images_per_prompt=1, max_sequence_length=max_sequence_length)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
        mask = mask.repeat_interleave(num_images_per_prompt, dim=0)
        cond = {"prompt_embeds": embeds, "prompt_mask": mask}
        batch = embeds.shape[0]

        # Same latent grid as QwenImagePipeline.prepare_latents (rounded down to even cells).
        h = 2 * (int(height) // (self.vae_scale_factor * 2))
        w = 2 * (int(width) // (self.vae_scale_factor * 2))
        channels = self.transformer.config.in_channels // 4
        noise = self._noise((batch, channels, h, w), latents, generator, device)
        x = self._sample(QwenImageVelocity(self.transformer), noise, cond, cfg, generator, device)

        if output_type == "latent":
            images = x
        else:
            pixels = decode_latents(self.vae, x)
            images = self.image_processor.postprocess(pixels, output_type=output_type,
                                                      do_denormalize=[False] * pixels.shape[0])
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return QwenImagePipelineOutput(images=images)


def _on_device(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """The sampler draws its re-noising on the latents' device; derive a generator there from a
    CPU one deterministically (the same seed still gives the same images)."""
    if generator is None or generator.device.type == torch.device(device).type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)
