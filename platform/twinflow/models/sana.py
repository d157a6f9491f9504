"""SANA as a backbone (models/backbone.py): linear-attention DiT, DC-AE latents, a Gemma-2 text encoder.

The TwinFlow paper distils SANA 0.6B and 1.6B to one step (1-NFE GenEval 0.83 / 0.81); this module is the
whole family, the way Qwen-Image's modules are: the transformer + E2, the velocity F(x_t, t, r, cond), the
any-step pipeline, the encode side, the published sizes and a tiny random-weight folder for tests.

  transformer  diffusers' ``SanaTransformer2DModel`` + E2 (models/target_time.py): E1 is its timestep
               embedding ``time_embed.emb`` (before adaLN-single's projection), so both the blocks'
               modulation and the output norm see E1(t) + (t − r)·E2(r). SANA is fed timesteps t·1000
               (× ``timestep_scale``); (t − r) stays in signed-time units.
  velocity     latents [B, C, h, w] go in unpacked (patch_size 1 patchifies inside); the condition's
               mask is the pipeline's ``encoder_attention_mask``. SANA's flow-matching parameterisation is
               this platform's: x_t = t·z + (1 − t)·x, v = z − x (its scheduler's "flow_prediction").
  prompts      ``SanaPipeline.encode_prompt`` with the pipeline's own complex human instruction, as
               generation uses it; ∅ is the pipeline's negative prompt "" (encoded without the instruction).
  latents      DC-AE latents × ``scaling_factor`` (no per-channel statistics).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import PixArtAlphaCombinedTimestepSizeEmbeddings
# Imported for diffusers' component loader (see qwen_image.py): a folder names this module as the
# transformer's library and diffusers looks up ``ModelMixin`` in it.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.pipelines.sana.pipeline_output import SanaPipelineOutput
from torch import nn

from twinflow.method.sampler import DEFAULT_STEPS
from twinflow.models.backbone import Backbone, PublishedConfig
from twinflow.models.pipeline import TwinFlowPipelineMixin
from twinflow.models.target_time import TargetTimeMixin

COMPLEX_HUMAN_INSTRUCTION: list[str] = inspect.signature(SanaPipeline.__call__).parameters[
    "complex_human_instruction"].default
"""The instruction SanaPipeline prepends to every prompt at generation (its own default)."""


class TwinFlowSanaTransformer2DModel(TargetTimeMixin, SanaTransformer2DModel):
    """SANA's transformer with TwinFlow's target-time embedder E2 (see the module docstring)."""

    E1_PATH = "time_embed.emb"

    @register_to_config
    def __init__(self, in_channels: int = 32, out_channels: int | None = 32, num_attention_heads: int = 70,
                 attention_head_dim: int = 32, num_layers: int = 20, num_cross_attention_heads: int | None = 20,
                 cross_attention_head_dim: int | None = 112, cross_attention_dim: int | None = 2240,
                 caption_channels: int = 2304, mlp_ratio: float = 2.5, dropout: float = 0.0,
                 attention_bias: bool = False, sample_size: int = 32, patch_size: int = 1,
                 norm_elementwise_affine: bool = False, norm_eps: float = 1e-6, interpolation_scale: int | None = None,
                 guidance_embeds: bool = False, guidance_embeds_scale: float = 0.1, qk_norm: str | None = None,
                 timestep_scale: float = 1.0, target_time_embed: bool = True):
        if guidance_embeds and target_time_embed:
            raise ValueError("SANA with guidance_embeds (SANA-Sprint's embedding) has no plain timestep embedding "
                             "for E2; use a SANA checkpoint without guidance embeddings")
        super().__init__(in_channels=in_channels, out_channels=out_channels, num_attention_heads=num_attention_heads,
                         attention_head_dim=attention_head_dim, num_layers=num_layers,
                         num_cross_attention_heads=num_cross_attention_heads,
                         cross_attention_head_dim=cross_attention_head_dim, cross_attention_dim=cross_attention_dim,
                         caption_channels=caption_channels, mlp_ratio=mlp_ratio, dropout=dropout,
                         attention_bias=attention_bias, sample_size=sample_size, patch_size=patch_size,
                         norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps,
                         interpolation_scale=interpolation_scale, guidance_embeds=guidance_embeds,
                         guidance_embeds_scale=guidance_embeds_scale, qk_norm=qk_norm, timestep_scale=timestep_scale)
        self._init_target_time(target_time_embed)

    @property
    def time_scale(self) -> float:
        """The timestep value that means t = 1: SANA's pipeline feeds σ·1000·timestep_scale."""
        return 1000.0 * float(self.config.timestep_scale)

    def make_target_embedder(self) -> nn.Module:
        dim = self.time_embed.emb.timestep_embedder.linear_1.out_features
        return PixArtAlphaCombinedTimestepSizeEmbeddings(dim, size_emb_dim=dim // 3, use_additional_conditions=False)

    def embed_target(self, e2: nn.Module, r_raw: torch.Tensor, e1_args: tuple, e1_kwargs: dict):
        t_cast = e1_args[0] if e1_args else e1_kwargs["timestep"]
        r = r_raw.to(device=t_cast.device, dtype=t_cast.dtype)  # embedded exactly as E1 embeds t
        dtype = e2.timestep_embedder.linear_1.weight.dtype  # E2 may be fp32 beside a bf16 base (LoRA mode)
        return e2(r, resolution=None, aspect_ratio=None, batch_size=r.shape[0], hidden_dtype=dtype), 0

    def forward(self, *args, target_timestep: torch.Tensor | None = None, **kwargs):
        """diffusers' forward plus ``target_timestep`` r [B], on the same scale as ``timestep`` (None: r = t)."""
        t = kwargs.get("timestep", args[2] if len(args) > 2 else None)
        return self._run_with_target(t, target_timestep, lambda: super(TargetTimeMixin, self).forward(*args, **kwargs))


class SanaVelocity(nn.Module):
    """TwinFlow's F(x_t, t, r, cond) over a ``TwinFlowSanaTransformer2DModel``.

    x_t     normalised DC-AE latents [B, C, h, w];  t, r  [B] signed times in [−1, 1]
    cond    {"prompt_embeds": [B, L, D], "prompt_mask": [B, L]};  returns the average velocity, x_t's dtype.
    """

    def __init__(self, transformer: TwinFlowSanaTransformer2DModel):
        super().__init__()
        self.transformer = transformer

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.transformer.patch_embed.proj.weight.dtype

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: dict) -> torch.Tensor:
        b = x_t.shape[0]
        dtype, scale = self.compute_dtype, self.transformer.time_scale
        mask = cond.get("prompt_mask")
        out = self.transformer(hidden_states=x_t.to(dtype), encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                               encoder_attention_mask=mask, timestep=t.reshape(b) * scale,
                               target_timestep=r.reshape(b) * scale, return_dict=False)[0]
        return out.to(x_t.dtype)


class TwinFlowSanaPipeline(TwinFlowPipelineMixin, SanaPipeline):
    r"""Text-to-image with a TwinFlow SANA transformer at 1/2/4/N NFE (guidance 0: TwinFlow distils CFG into
    the weights). Components as ``SanaPipeline`` (the scheduler is kept for folder compatibility, unused);
    config ``sampler_presets`` and ``default_steps`` as ``TwinFlowQwenImagePipeline``."""

    TRANSFORMER_CLASS = TwinFlowSanaTransformer2DModel

    def __init__(self, tokenizer, text_encoder, vae: AutoencoderDC, transformer: TwinFlowSanaTransformer2DModel,
                 scheduler: DPMSolverMultistepScheduler, sampler_presets: dict | None = None,
                 default_steps: int = DEFAULT_STEPS):
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                         scheduler=scheduler)
        self._register_sampler(sampler_presets, default_steps)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, sampler=None,
                 num_images_per_prompt: int = 1, latents: torch.Tensor | None = None, max_sequence_length: int = 300,
                 output_type: str = "pil", return_dict: bool = True):
        """Generate images; arguments as ``TwinFlowQwenImagePipeline.__call__`` (latents [B, C, h, w])."""
        height = height or self.transformer.config.sample_size * self.vae_scale_factor
        width = width or self.transformer.config.sample_size * self.vae_scale_factor
        cfg = self._resolve_sampler(num_inference_steps, sampler)
        device = self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        cond = SANA.encode_prompts(self, prompts, max_sequence_length, device=device, dtype=None)
        cond = {k: v.repeat_interleave(num_images_per_prompt, dim=0) for k, v in cond.items()}
        batch = cond["prompt_embeds"].shape[0]
        shape = (batch, self.transformer.config.in_channels, int(height) // self.vae_scale_factor,
                 int(width) // self.vae_scale_factor)
        noise = self._noise(shape, latents, generator, device)
        x = self._sample(SanaVelocity(self.transformer), noise, cond, cfg, generator, device)
        if output_type == "latent":
            images = x
        else:
            pixels = SANA.decode_latents(self.vae, x)
            images = self.image_processor.postprocess(pixels, output_type=output_type,
                                                      do_denormalize=[False] * pixels.shape[0])
        self.maybe_free_model_hooks()
        return SanaPipelineOutput(images=images) if return_dict else (images,)


class SanaBackbone(Backbone):
    name = "sana"
    pipeline_class_names = ("SanaPipeline", "TwinFlowSanaPipeline")
    transformer_class_names = ("SanaTransformer2DModel", "TwinFlowSanaTransformer2DModel")
    # the linear and cross attention's projections and E1's MLP (the Mix-FFN is convolutions)
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "timestep_embedder.linear_1",
                            "timestep_embedder.linear_2")
    uncond_prompt = ""
    max_sequence_length = 300

    def transformer_class(self) -> type:
        return TwinFlowSanaTransformer2DModel

    def pipeline_class(self) -> type:
        return TwinFlowSanaPipeline

    def base_pipeline_class(self) -> type:
        return SanaPipeline

    def vae_class(self) -> type:
        return AutoencoderDC

    def velocity(self, transformer) -> nn.Module:
        return SanaVelocity(transformer)

    def latent_channels(self, transformer_config: dict) -> int:
        return int(transformer_config["in_channels"])

    def text_pipeline(self, text_encoder, tokenizer):
        return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=None, scheduler=None)

    def encode_prompts(self, pipe, prompts: Sequence[str], max_sequence_length: int,
                       device: torch.device | str | None = None,
                       dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts to encode")
        if isinstance(pipe, (tuple, list)):
            pipe = self.text_pipeline(*pipe)
        # SanaPipeline encodes the negative prompt "" without the instruction; ∅ is encoded the same way.
        instruction = None if prompts == [self.uncond_prompt] else COMPLEX_HUMAN_INSTRUCTION
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                max_sequence_length=max_sequence_length,
                                                complex_human_instruction=instruction)
        if dtype is not None:
            embeds = embeds.to(dtype)
        return {"prompt_embeds": embeds, "prompt_mask": mask.to(torch.long)}

    def vae_scale_factor(self, vae) -> int:
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1)

    def latent_grid(self, vae_config: dict, height: int, width: int) -> tuple[int, int]:
        f = 2 ** (len(vae_config["encoder_block_out_channels"]) - 1)
        return int(height) // f, int(width) // f

    @torch.no_grad()
    def encode_images(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [B, 3, H, W] in [-1, 1], got shape {tuple(pixels.shape)}")
        f = self.vae_scale_factor(vae)
        if pixels.shape[-2] % f or pixels.shape[-1] % f:
            raise ValueError(f"image size {pixels.shape[-2]}×{pixels.shape[-1]} must be a multiple of the DC-AE "
                             f"factor {f}")
        param = next(vae.parameters())
        z = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent
        return z.float() * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        param = next(vae.parameters())
        z = (latents.float() / vae.config.scaling_factor).to(device=param.device, dtype=param.dtype)
        images = vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def published_configs(self) -> dict[str, PublishedConfig]:
        # The diffusers checkpoints' transformer/config.json (SANA paper sizes 0.6B and 1.6B): width = heads ×
        # 32 (linear attention), cross-attention heads × head dim = width, caption channels = Gemma-2-2B's 2304.
        common = {"in_channels": 32, "out_channels": 32, "attention_head_dim": 32, "caption_channels": 2304,
                  "mlp_ratio": 2.5, "sample_size": 32, "patch_size": 1, "norm_elementwise_affine": False,
                  "norm_eps": 1e-6}
        return {
            "sana-0.6b": PublishedConfig("Efficient-Large-Model/Sana_600M_1024px_diffusers", {
                **common, "num_attention_heads": 36, "num_layers": 28, "num_cross_attention_heads": 16,
                "cross_attention_head_dim": 72, "cross_attention_dim": 1152}, "0.6B"),
            "sana-1.6b": PublishedConfig("Efficient-Large-Model/Sana_1600M_1024px_diffusers", {
                **common, "num_attention_heads": 70, "num_layers": 20, "num_cross_attention_heads": 20,
                "cross_attention_head_dim": 112, "cross_attention_dim": 2240}, "1.6B"),
        }

    def build_tiny(self, path: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
        return build_tiny_sana(path, seed=seed)


SANA = SanaBackbone()


# ---------------------------------------------------------------------------
# a tiny random-weight SANA pipeline folder, for tests and ``model.path: tiny-sana``
# ---------------------------------------------------------------------------

TINY_SANA: dict[str, Any] = {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8,
                             "num_layers": 2, "num_cross_attention_heads": 2, "cross_attention_head_dim": 8,
                             "cross_attention_dim": 16, "caption_channels": 16, "sample_size": 8, "patch_size": 1}


def build_tiny_sana(path: str | Path, seed: int = 0) -> Path:
    """A random-weight ``SanaPipeline`` folder (plain SANA classes, so it loads as the hub's do): a 2-block
    transformer on 4-channel latents, a 2-stage DC-AE (factor 2), a one-layer Gemma-2 text encoder over the
    512-token BPE of models/tiny_qwen.py. Deterministic for a seed; seconds on a CPU."""
    import shutil

    from transformers import Gemma2Config, Gemma2Model

    from twinflow.models.tiny_qwen import build_bpe_tokenizer

    from tokenizers.processors import TemplateProcessing

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    tokenizer = build_bpe_tokenizer()
    # Gemma's tokenizer starts every text with <bos>, so SANA's negative prompt "" is one valid token;
    # the tiny BPE does the same with its <|endoftext|>.
    bos = "<|endoftext|>"
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))])
    tokenizer.bos_token = bos
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(**TINY_SANA)
    torch.manual_seed(seed + 1)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=4, encoder_block_types="ResBlock",
                        decoder_block_types="ResBlock", encoder_block_out_channels=(8, 16),
                        decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                        decoder_qkv_multiscales=((), ()), scaling_factor=0.41407)
    torch.manual_seed(seed + 2)
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))).eval()
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                 scheduler=scheduler).save_pretrained(path)
    return path


def named_architecture(name: str) -> dict[str, Any]:
    """The transformer config ``build_tiny_sana`` writes (for --dry-run plans without building it)."""
    return {"_class_name": "SanaTransformer2DModel", **TINY_SANA}


def named_tiny(name: str, build: bool = True) -> str:
    """twinflow.named provider for ``tiny-sana``."""
    from twinflow.models.tiny_qwen import build_once, cache_dir

    target = cache_dir() / "tiny-sana-pipeline"
    if build:
        build_once(target, "model_index.json", lambda tmp: build_tiny_sana(tmp))
    return str(target)
