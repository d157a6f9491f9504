"""TwinFlowQwenImagePipeline: diffusers loading/saving, any-step generation, sampler presets.

Runs on the tiny random-weight Qwen-Image folder (tests/conftest.py::tiny_qwen_image). Its VAE
downsamples by 4 (the real one by 8), so a 16×24 image is a 4×6 latent grid.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from twinflow.config import ConfigError
from twinflow.method.sampler import SamplerConfig, few_step, ode, sample
from twinflow.models.pipeline import TwinFlowQwenImagePipeline, default_sampler_presets
from twinflow.models.qwen_encode import decode_latents, encode_prompts
from twinflow.models.qwen_image import TwinFlowQwenImageTransformer2DModel
from twinflow.models.qwen_velocity import QwenImageVelocity

torch.set_num_threads(2)

H, W = 16, 24
PROMPTS = ["a red cat", "two dogs on the left of a blue car"]


@pytest.fixture(scope="module")
def pipe(tiny_qwen_image):
    return TwinFlowQwenImagePipeline.from_pretrained(tiny_qwen_image)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_plain_qwen_image_folder_loads_with_e2_and_default_presets(tiny_qwen_image, caplog):
    with caplog.at_level(logging.INFO, logger="twinflow"):
        pipe = TwinFlowQwenImagePipeline.from_qwen_image(tiny_qwen_image)
    assert isinstance(pipe.transformer, TwinFlowQwenImageTransformer2DModel)
    assert "copy-initialised" in caplog.text
    assert pipe.config.default_steps == 2
    assert pipe.config.sampler_presets == default_sampler_presets()
    assert pipe.sampler_for(2) == few_step(2) and pipe.sampler_for(None) == few_step(2)
    assert pipe.sampler_for(3) == few_step(3)  # no preset: the released few-step rule


@pytest.mark.parametrize("nfe", [1, 4])
def test_generates_images_of_the_requested_size(pipe, nfe):
    out = pipe(prompt=PROMPTS, height=H, width=W, num_inference_steps=nfe, generator=_gen())
    assert len(out.images) == 2 and all(isinstance(im, Image.Image) for im in out.images)
    assert all(im.size == (W, H) for im in out.images)
    pt = pipe(prompt=PROMPTS[:1], height=H, width=W, num_inference_steps=nfe, generator=_gen(), output_type="pt")
    assert pt.images.shape == (1, 3, H, W)
    assert torch.isfinite(pt.images).all() and 0 <= pt.images.min() and pt.images.max() <= 1


def test_generation_is_the_any_step_sampler_on_the_adapter(pipe):
    """The pipeline = noise from the generator, then method.sampler.sample with the preset grid."""
    nfe = 2
    out = pipe(prompt=PROMPTS, height=H, width=W, num_inference_steps=nfe, generator=_gen(7), output_type="latent")
    g = _gen(7)
    noise = randn_tensor((2, 4, H // 4, W // 4), generator=g, dtype=torch.float32)
    cond = encode_prompts(pipe, PROMPTS, max_sequence_length=512)
    ref = sample(QwenImageVelocity(pipe.transformer), noise, cond, few_step(nfe), generator=g)
    assert out.images.shape == (2, 4, H // 4, W // 4)
    torch.testing.assert_close(out.images, ref, rtol=0, atol=0)
    pt = pipe(prompt=PROMPTS, height=H, width=W, num_inference_steps=nfe, generator=_gen(7), output_type="pt")
    torch.testing.assert_close(pt.images, decode_latents(pipe.vae, ref), rtol=1e-6, atol=1e-6)


def test_seeded_generation_is_deterministic(pipe):
    def run(seed):
        return pipe(prompt=PROMPTS, height=H, width=W, num_inference_steps=4, generator=_gen(seed),
                    output_type="np").images

    a, b, c = run(3), run(3), run(4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_one_generator_per_image_makes_images_independent_of_the_batch(pipe):
    """The eval pool shards prompts arbitrarily; an image must depend on its own seed only."""
    both = pipe(prompt=PROMPTS, height=H, width=W, num_inference_steps=4, generator=[_gen(11), _gen(12)],
                output_type="np").images
    second = pipe(prompt=PROMPTS[1:], height=H, width=W, num_inference_steps=4, generator=[_gen(12)],
                  output_type="np").images
    np.testing.assert_allclose(both[1], second[0], atol=1e-5)


def test_save_pretrained_round_trip_keeps_e2_and_sampler_settings(pipe, tmp_path):
    # a "trained" E2: visible at 1 NFE, where the model is queried at (t, r) = (0.999, 0)
    with torch.no_grad():
        before = pipe(prompt=PROMPTS, height=H, width=W, num_inference_steps=1, generator=_gen(), output_type="pt")
        saved_e2 = {k: v.clone() for k, v in pipe.transformer.time_text_embed_2.state_dict().items()}
        for p in pipe.transformer.time_text_embed_2.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=_gen(1)))
    try:
        after = pipe(prompt=PROMPTS, height=H, width=W, num_inference_steps=1, generator=_gen(), output_type="pt")
        assert (after.images - before.images).abs().max() > 1e-4
        three = SamplerConfig(steps=3, gap=(0.001, 0.4), stochastic_ratio=0.0, style="any")
        pipe.set_sampler_presets({**default_sampler_presets(), 3: three}, default_steps=3)
        pipe.save_pretrained(tmp_path / "export")

        index = json.loads((tmp_path / "export" / "model_index.json").read_text())
        assert index["_class_name"] == "TwinFlowQwenImagePipeline"
        assert index["transformer"] == ["twinflow.models.qwen_image", "TwinFlowQwenImageTransformer2DModel"]
        assert index["default_steps"] == 3 and index["sampler_presets"]["3"]["style"] == "any"
        config = json.loads((tmp_path / "export" / "transformer" / "config.json").read_text())
        assert config["target_time_embed"] is True

        loaded = TwinFlowQwenImagePipeline.from_pretrained(tmp_path / "export")
        assert loaded.sampler_for(None) == three and loaded.sampler_for(4) == few_step(4)
        again = loaded(prompt=PROMPTS, height=H, width=W, num_inference_steps=1, generator=_gen(), output_type="pt")
        torch.testing.assert_close(again.images, after.images, rtol=0, atol=0)
        default = loaded(prompt=PROMPTS, height=H, width=W, generator=_gen(), output_type="latent")
        explicit = loaded(prompt=PROMPTS, height=H, width=W, generator=_gen(), sampler=three, output_type="latent")
        torch.testing.assert_close(default.images, explicit.images, rtol=0, atol=0)
    finally:
        with torch.no_grad():
            pipe.transformer.time_text_embed_2.load_state_dict(saved_e2)
        pipe.set_sampler_presets(default_sampler_presets(), default_steps=2)


def test_sampler_argument_and_bad_inputs(pipe):
    out = pipe(prompt=PROMPTS[:1], height=H, width=W, sampler=ode(3), generator=_gen(), output_type="latent")
    assert torch.isfinite(out.images).all()
    with pytest.raises(ValueError, match="disagrees"):
        pipe(prompt=PROMPTS[:1], height=H, width=W, num_inference_steps=2, sampler=ode(3))
    with pytest.raises(ValueError, match="got 1 generators for 2 images"):
        pipe(prompt=PROMPTS, height=H, width=W, generator=[_gen(0)])
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(prompt=PROMPTS[:1], height=H, width=W, latents=torch.zeros(1, 4, 3, 3))
    with pytest.raises(ConfigError, match="sampler.steps"):
        pipe(prompt=PROMPTS[:1], height=H, width=W, sampler=SamplerConfig(steps=0))
    with pytest.raises(ValueError, match=r"sampler_presets\.2: preset has steps=4"):
        pipe.set_sampler_presets({2: few_step(4)})


def test_given_latents_and_num_images_per_prompt(pipe):
    """Prompts repeat as [p0, p0, p1, p1]; with ρ = 0 the result depends only on (noise, prompt)."""
    noise = torch.randn(4, 4, H // 4, W // 4, generator=_gen(2))
    noise[1] = noise[0]
    noise[3] = noise[0]
    out = pipe(prompt=PROMPTS, height=H, width=W, num_images_per_prompt=2, latents=noise, sampler=ode(2),
               output_type="latent").images
    assert out.shape == (4, 4, H // 4, W // 4)
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=0)       # same prompt, same noise
    assert (out[3] - out[0]).abs().max() > 1e-4                       # other prompt, same noise
    assert (out[2] - out[3]).abs().max() > 1e-4                       # same prompt, other noise
