"""The backbone contract (models/backbone.py) for every registered family (models/families.py): what the
trainer, export, the planner and the evals rely on, checked on tiny random-weight pipeline folders built
from configs (Qwen-Image: models/tiny_qwen.py, SANA: models/sana.py) and on the published configs.

Real parts: diffusers' own classes (QwenImagePipeline / SanaPipeline, their transformers, VAEs and
save/load), peft, transformers' text encoders.
"""

from __future__ import annotations

import json

import pytest
import torch

from twinflow.config.errors import ConfigError
from twinflow.models.families import FAMILIES, backbone, backbone_for, family_of_hub_id
from twinflow.models.lora import LoraSettings, add_lora
from twinflow.models.target_time import E2_NAME

torch.set_num_threads(2)
PROMPTS = ["a handwritten digit three", "two dogs on the left of a blue car"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_folder(request, tmp_path_factory):
    family = backbone(request.param)
    return family, family.build_tiny(tmp_path_factory.mktemp(request.param) / "pipe", seed=0)


def _inputs(family, folder, batch: int = 2):
    """Latents of the family's shape for a 16 px image, the two prompts encoded by the family's pipeline."""
    pipe = family.load_encoding_pipeline(str(folder))
    cond = family.encode_prompts(pipe, PROMPTS[:batch], 32)
    vae_cfg = family.vae_class().load_config(str(folder), subfolder="vae")
    h, w = family.latent_grid(vae_cfg, 16, 16)
    channels = family.latent_channels(family.transformer_class().load_config(str(folder), subfolder="transformer"))
    return torch.randn(batch, channels, h, w, generator=torch.Generator().manual_seed(0)), cond, pipe


def test_the_family_is_read_from_the_folder_and_named_everywhere(family_folder):
    family, folder = family_folder
    assert backbone_for(str(folder)) is family
    assert backbone_for(str(folder / "transformer")) is family  # a transformer folder names its class too
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] in family.pipeline_class_names
    for name, published in family.published_configs().items():
        assert family_of_hub_id(published.hub_id) is family  # known hub ids resolve offline


def test_e2_at_t_equals_t_reproduces_the_pretrained_model_and_takes_negative_time(family_folder):
    family, folder = family_folder
    x, cond, _ = _inputs(family, folder)
    from twinflow.models.loading import load_twinflow_transformer

    velocity = family.velocity(load_twinflow_transformer(folder).eval())
    # the pretrained network: diffusers' own class of the family, the folder's weights, no E2 anywhere,
    # called through the same velocity adapter (which then passes r to nothing)
    stock = family.transformer_class().__bases__[-1].from_pretrained(folder, subfolder="transformer").eval()
    stock.time_scale = velocity.transformer.time_scale
    forward = stock.forward
    stock.forward = lambda *a, target_timestep=None, **k: forward(*a, **k)
    t = torch.tensor([0.7, 0.25])
    with torch.no_grad():
        at_t = velocity(x, t, t, cond)
        assert torch.equal(at_t, family.velocity(stock)(x, t, t, cond))
        assert not torch.equal(velocity(x, t, torch.zeros(2), cond), at_t)  # r enters through E2
        neg = velocity(x, -t, -t, cond)
        assert torch.isfinite(neg).all() and not torch.equal(neg, at_t)  # signed time: a different input


def test_default_lora_targets_exist_and_train_with_e2(family_folder):
    family, folder = family_folder
    from twinflow.models.loading import load_twinflow_transformer

    transformer = load_twinflow_transformer(folder)
    add_lora(transformer, LoraSettings(rank=4, alpha=4.0))  # empty targets: the family's default
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert any(".lora_A.default." in n for n in trainable)
    assert {n for n in trainable if n.startswith(E2_NAME + ".")}  # E2 trains in LoRA mode too
    assert all("lora_" in n or n.startswith(E2_NAME + ".") for n in trainable)  # the base is frozen
    for target in family.default_lora_targets:
        assert any(n.endswith(f"{target}.lora_A.default.weight") for n in trainable), target
    with pytest.raises(ConfigError, match=r"model\.lora\.targets: 'no_such_layer' matches no linear layer"):
        add_lora(load_twinflow_transformer(folder), LoraSettings(rank=4, targets=["no_such_layer"]))


def test_an_exported_folder_round_trips_through_the_familys_own_pipelines(family_folder, tmp_path):
    family, folder = family_folder
    twinflow_pipe = family.pipeline_class().from_pretrained(str(folder))
    with torch.no_grad():
        for p in twinflow_pipe.transformer.target_time_embedder.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a trained E2 must come back, not a fresh copy of E1
    twinflow_pipe.set_sampler_presets({1: {"steps": 1}}, default_steps=1)
    twinflow_pipe.save_pretrained(tmp_path / "export")
    kwargs = dict(prompt=[PROMPTS[0]], height=16, width=16, generator=torch.Generator().manual_seed(3),
                  output_type="pt")
    again = family.pipeline_class().from_pretrained(str(tmp_path / "export"))
    assert again.config.default_steps == 1
    a = twinflow_pipe(num_inference_steps=1, **kwargs).images
    b = again(num_inference_steps=1, **{**kwargs, "generator": torch.Generator().manual_seed(3)}).images
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # diffusers' own pipeline class of the family loads the exported folder (the TwinFlow transformer class
    # is resolved by its module path) and its weights are the trained ones
    stock = family.base_pipeline_class().from_pretrained(str(tmp_path / "export"))
    saved, loaded = twinflow_pipe.transformer.state_dict(), stock.transformer.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_encode_side_round_trips_pixels_and_gives_contiguous_masks(family_folder):
    family, folder = family_folder
    x, cond, pipe = _inputs(family, folder)
    mask = cond["prompt_mask"]
    assert mask.dtype == torch.long and cond["prompt_embeds"].shape[:2] == mask.shape
    for row in mask:  # valid tokens first, then padding: what the latent cache's trimming relies on
        n = int(row.sum())
        assert n > 0 and bool(row[:n].all()) and not bool(row[n:].any())
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    z = family.encode_images(pipe.vae, pixels)
    assert z.shape == x.shape and z.dtype == torch.float32
    images = family.decode_latents(pipe.vae, z)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    uncond = family.encode_prompts(pipe, [family.uncond_prompt], 32)
    assert uncond["prompt_embeds"].shape[0] == 1


def test_planner_parameter_counts_are_the_meta_models_and_near_the_published_sizes():
    from twinflow.plan.params import count_parameters, meta_transformer

    for name in FAMILIES:
        family = backbone(name)
        for label, published in family.published_configs().items():
            model = meta_transformer({"_class_name": family.transformer_class_names[0], **published.transformer})
            e2 = sum(p.numel() for n, p in model.named_parameters() if n.startswith(E2_NAME + "."))
            meta = sum(p.numel() for p in model.parameters())
            counts = count_parameters({"_class_name": family.transformer_class_names[0], **published.transformer})
            assert counts.total == meta, label
            # E2 is TwinFlow's addition; the base model's count rounds to the model card's figure
            assert abs((meta - e2) - published.published_params) <= published.rounding, (label, meta - e2)


def test_unknown_families_and_foreign_folders_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.family: unknown family 'flux'"):
        backbone("flux")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ConfigError, match=r"^model\.family: .*FluxPipeline, which is none of the known families"):
        backbone_for(str(tmp_path))
    with pytest.raises(ConfigError, match=r"^model\.family: auto cannot tell the family of 'someone/some-model'"):
        backbone_for("someone/some-model")
