"""Qwen-Image as TwinFlow's F: E2 target-time embedder, loading paths, LoRA, teachers, objective.

Everything runs on the tiny random-weight Qwen-Image folder (tests/conftest.py::tiny_qwen_image),
loaded through the same diffusers code paths as Qwen/Qwen-Image.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import pytest
import torch
from diffusers import QwenImageTransformer2DModel

from twinflow.config import ConfigError
from twinflow.method import BatchLayout, TwinFlowObjective, allocate_micro_batch, twinflow
from twinflow.models.config import ModelConfig
from twinflow.models.lora import (LoraEmaTeacher, LoraFrozenTeacher, LoraSettings, QWEN_IMAGE_LORA_TARGETS,
                                  active_adapter, lora_state_dict, make_qwen_teacher, merge_lora)
from twinflow.models.qwen_encode import (UNCOND_PROMPT, decode_latents, denormalise_latents, encode_images,
                                         encode_prompts, latent_size, load_text_encoding_pipeline,
                                         vae_scale_factor,
                                         pad_prompt_embeds, split_prompt_embeds, uncond_condition)
from twinflow.models.qwen_image import QWEN_IMAGE_20B_CONFIG, TwinFlowQwenImageTransformer2DModel
from twinflow.models.loading import build_twinflow_transformer, build_velocity_model, load_twinflow_transformer
from twinflow.models.qwen_velocity import QwenImageVelocity, image_shapes, pack_latents, parameter_count, unpack_latents

torch.set_num_threads(2)

PROMPTS = ["a red cat", "two dogs on the left of a blue car", "seven", "a photo of a handwritten digit eight",
           "a small green bus", "three black cats above a yellow dog"]
MAX_LEN = 1024  # the tiny BPE makes long token sequences; keep every prompt whole so masks pad


@pytest.fixture(scope="module")
def text(tiny_qwen_image):
    return load_text_encoding_pipeline(str(tiny_qwen_image))


@pytest.fixture(scope="module")
def cond(text):
    return encode_prompts(text, PROMPTS, max_sequence_length=MAX_LEN)


def _latents(n: int, h: int = 8, w: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, h, w, generator=torch.Generator().manual_seed(seed))


def _base_forward(base: QwenImageTransformer2DModel, x, t, cond):
    """Exactly the call QwenImagePipeline makes (mask None when nothing is padded)."""
    b, _, h, w = x.shape
    mask = cond["prompt_mask"]
    mask = None if bool(mask.all()) else mask
    out = base(hidden_states=pack_latents(x), encoder_hidden_states=cond["prompt_embeds"],
               encoder_hidden_states_mask=mask, timestep=t, img_shapes=image_shapes(b, h, w), return_dict=False)[0]
    return unpack_latents(out, h, w)


# ---------------------------------------------------------------------------
# the adapter and E2
# ---------------------------------------------------------------------------


def test_pack_unpack_round_trip_matches_pipeline_layout():
    x = _latents(2, 8, 6)
    packed = pack_latents(x)
    assert packed.shape == (2, 4 * 3, 16)
    torch.testing.assert_close(unpack_latents(packed, 8, 6), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="even"):
        pack_latents(_latents(1, 7, 6))


def test_plain_checkpoint_gets_e2_copied_from_e1_and_logs_it(tiny_qwen_image, caplog):
    with caplog.at_level(logging.INFO, logger="twinflow.models.target_time"):
        model = load_twinflow_transformer(tiny_qwen_image)
    assert "copy-initialised" in caplog.text
    assert model.config.target_time_embed
    e1, e2 = model.time_text_embed.state_dict(), model.time_text_embed_2.state_dict()
    assert set(e2) == {"timestep_embedder.linear_1.weight", "timestep_embedder.linear_1.bias",
                       "timestep_embedder.linear_2.weight", "timestep_embedder.linear_2.bias"}
    for k, v in e2.items():
        assert torch.equal(v, e1[k])
        assert not v.is_meta


def test_trained_e2_round_trips_through_save_pretrained(tiny_qwen_image, tmp_path, caplog):
    model = load_twinflow_transformer(tiny_qwen_image)
    with torch.no_grad():
        for p in model.time_text_embed_2.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path / "tf")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="twinflow.models.target_time"):
        again = TwinFlowQwenImageTransformer2DModel.from_pretrained(tmp_path / "tf")
    assert "copy-initialised" not in caplog.text
    sd, sd2 = model.state_dict(), again.state_dict()
    assert set(sd) == set(sd2)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert again.config.target_time_embed


def test_diagonal_with_fresh_e2_is_exactly_the_pretrained_diffusers_model(tiny_qwen_image, cond):
    base = QwenImageTransformer2DModel.from_pretrained(tiny_qwen_image, subfolder="transformer").eval()
    velocity = QwenImageVelocity(load_twinflow_transformer(tiny_qwen_image).eval())
    assert not bool(cond["prompt_mask"].all())  # the padded-mask path is exercised
    x = _latents(6)
    t = torch.tensor([0.0, 0.3, 0.999, 1.0, -0.5, -0.9])
    with torch.no_grad():
        ours = velocity(x, t, t, cond)
        ref = _base_forward(base, x, t, cond)
        # called the way the stock pipeline calls it (no target time): also the pretrained model
        plain = _base_forward(velocity.transformer, x, t, cond)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(plain, ref, rtol=0, atol=0)
    # unpadded batch: the pipeline passes mask=None, so must we
    full = {k: v[:1] for k, v in cond.items()}
    with torch.no_grad():
        torch.testing.assert_close(velocity(x[:1], t[:1], t[:1], full), _base_forward(base, x[:1], t[:1], full),
                                   rtol=0, atol=0)


def test_negative_time_and_target_time_change_the_output_per_sample(tiny_qwen_image, cond):
    velocity = QwenImageVelocity(load_twinflow_transformer(tiny_qwen_image).eval())
    x = _latents(6)
    tau = torch.full((6,), 0.6)
    with torch.no_grad():
        pos = velocity(x, tau, tau, cond)
        neg = velocity(x, -tau, -tau, cond)
        assert torch.isfinite(neg).all()
        assert (pos - neg).abs().max() > 1e-3  # the fake branch is told apart by the sign alone
        r = torch.tensor([0.6, 0.0, 0.6, 0.3, 0.6, 0.0])
        jump = velocity(x, tau, r, cond)
    same = r == tau
    torch.testing.assert_close(jump[same], pos[same], rtol=0, atol=0)  # (t − r) = 0 rows untouched
    assert ((jump[~same] - pos[~same]).flatten(1).abs().amax(1) > 1e-4).all()


def test_temb_is_e1_of_t_plus_t_minus_r_times_e2_of_r(tiny_qwen_image, cond):
    model = load_twinflow_transformer(tiny_qwen_image).eval()
    with torch.no_grad():  # make E2 differ from E1 so the check is not E1-symmetric
        for p in model.time_text_embed_2.parameters():
            p.mul_(0.5).add_(0.1)
    seen = {}

    def capture(module, args, out):  # registered after ours: sees the final temb
        seen["temb"] = out.clone()

    handle = model.time_text_embed.register_forward_hook(capture)
    x, t, r = _latents(6), torch.linspace(-0.9, 1.0, 6), torch.linspace(-1.0, 0.7, 6)
    with torch.no_grad():
        QwenImageVelocity(model)(x, t, r, cond)
        handle.remove()
        hs = torch.zeros(0, model.inner_dim)
        expected = model.time_text_embed(t, hs) + (t - r)[:, None] * model.time_text_embed_2(r, hs)
    torch.testing.assert_close(seen["temb"], expected, rtol=1e-6, atol=1e-6)


def test_zero_cond_t_models_get_the_e2_term_on_their_own_rows_only():
    torch.manual_seed(0)
    cfg = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
               num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4), zero_cond_t=True)
    model = build_twinflow_transformer(cfg).eval()
    base = QwenImageTransformer2DModel(**cfg).eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("time_text_embed_2.")})
    x, t = _latents(2), torch.tensor([0.4, 0.8])
    c = {"prompt_embeds": torch.randn(2, 5, 16), "prompt_mask": torch.ones(2, 5, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(QwenImageVelocity(model)(x, t, t, c), _base_forward(base, x, t, c), rtol=0, atol=0)
        assert (QwenImageVelocity(model)(x, t, torch.zeros(2), c) - _base_forward(base, x, t, c)).abs().max() > 1e-4


def test_transformer_without_e2_refuses_a_target_time():
    model = build_twinflow_transformer(dict(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                            axes_dims_rope=(8, 4, 4), target_time_embed=False))
    assert not hasattr(model, "time_text_embed_2")
    c = {"prompt_embeds": torch.randn(1, 3, 16), "prompt_mask": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="target_time_embed"):
        QwenImageVelocity(model)(_latents(1), torch.ones(1), torch.zeros(1), c)


# ---------------------------------------------------------------------------
# building and loading for 20B
# ---------------------------------------------------------------------------


def test_real_qwen_image_config_builds_on_meta_with_20b_parameters():
    from accelerate import init_empty_weights

    model = build_twinflow_transformer(QWEN_IMAGE_20B_CONFIG, torch_dtype=torch.bfloat16,
                                       init_context=init_empty_weights())
    assert all(p.is_meta for p in model.parameters())
    assert model.inner_dim == 24 * 128 and len(model.transformer_blocks) == 60
    assert model.config.joint_attention_dim == 3584 and model.config.in_channels == 64
    base = parameter_count(model) - parameter_count(model, ["time_text_embed_2."])
    assert 20.0e9 < base < 20.9e9  # "20B MMDiT"
    e2 = parameter_count(model, ["time_text_embed_2."])
    assert e2 == 256 * 3072 + 3072 + 3072 * 3072 + 3072  # two linears, as E1


@pytest.mark.parametrize("sharded", [False, True])
def test_streaming_load_inside_an_init_context_equals_from_pretrained(tiny_qwen_image, tmp_path, sharded):
    from accelerate import init_empty_weights

    reference = load_twinflow_transformer(tiny_qwen_image)
    source = tiny_qwen_image
    if sharded:  # a multi-file checkpoint with an index, like the real 20B one
        plain = QwenImageTransformer2DModel.from_pretrained(tiny_qwen_image, subfolder="transformer")
        plain.save_pretrained(tmp_path / "transformer", max_shard_size="200KB")
        assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
        source = tmp_path
    gathered = []

    def gather(params):  # stands in for deepspeed.zero.GatheredParameters(params, modifier_rank=0)
        gathered.append(len(params))
        return contextlib.nullcontext()

    for ctx in (init_empty_weights(), contextlib.nullcontext()):
        model = load_twinflow_transformer(source, init_context=ctx, gather_context=gather)
        sd, ref = model.state_dict(), reference.state_dict()
        assert set(sd) == set(ref)
        for k in ref:
            assert not sd[k].is_meta, k
            assert torch.equal(sd[k], ref[k]), k
    assert gathered and sum(gathered) > 0


# ---------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------


def _lora_model(path, ema=False, rank=4):
    return load_twinflow_transformer(path, lora=LoraSettings(rank=rank, alpha=rank), ema_adapter=ema)


def test_lora_wraps_the_reference_targets_but_not_e2(tiny_qwen_image):
    from peft.tuners.lora import LoraLayer

    model = _lora_model(tiny_qwen_image)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    for target in QWEN_IMAGE_LORA_TARGETS:
        assert any(n == target or n.endswith("." + target) for n in wrapped), target
    assert "time_text_embed.timestep_embedder.linear_1" in wrapped
    assert not any(n.startswith("time_text_embed_2") for n in wrapped)
    for name, p in model.named_parameters():
        trainable = "lora_" in name or name.startswith("time_text_embed_2.")
        assert p.requires_grad == trainable, name
        if trainable:
            assert p.dtype == torch.float32


def test_lora_at_init_is_the_base_model(tiny_qwen_image, cond):
    x, t = _latents(6), torch.linspace(0.1, 0.9, 6)
    with torch.no_grad():
        lora = QwenImageVelocity(_lora_model(tiny_qwen_image).eval())(x, t, t, cond)
        full = QwenImageVelocity(load_twinflow_transformer(tiny_qwen_image).eval())(x, t, t, cond)
    torch.testing.assert_close(lora, full, rtol=0, atol=0)  # gaussian init: lora_B = 0


def test_unknown_lora_target_is_a_config_error(tiny_qwen_image):
    with pytest.raises(ConfigError, match=r"model\.lora\.targets: 'to_qkv'"):
        load_twinflow_transformer(tiny_qwen_image, lora=LoraSettings(rank=2, alpha=2, targets=["to_q", "to_qkv"]))


def test_lora_mode_trains_e2_and_lora_and_leaves_the_base_untouched(tiny_qwen_image, cond):
    model = _lora_model(tiny_qwen_image).train()
    velocity = QwenImageVelocity(model)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    x = _latents(6)
    t, r = torch.full((6,), 0.9), torch.zeros(6)  # (1, 0)-like rows: the E2 term is active
    loss = velocity(x, t, r, cond).pow(2).mean()
    loss.backward()
    e2_grads = [p.grad for n, p in trainable.items() if n.startswith("time_text_embed_2.")]
    assert len(e2_grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in e2_grads)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    assert any(not torch.equal(trainable[n], before[n]) for n in trainable if n.startswith("time_text_embed_2."))
    assert any(not torch.equal(trainable[n], before[n]) for n in trainable if "lora_B" in n)


def _perturb_default_lora(model, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ("lora_" in n and ".default." in n) or n.startswith("time_text_embed_2."):
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_lora_ema_teacher_update_math_and_evaluation(tiny_qwen_image, cond):
    model = _lora_model(tiny_qwen_image, ema=True).eval()
    velocity = QwenImageVelocity(model)
    teacher = make_qwen_teacher("ema", velocity, ema_decay=0.9)
    assert isinstance(teacher, LoraEmaTeacher) and not teacher.rollout_uses_online
    names = [n for n, _ in model.named_parameters() if ".default." in n and "lora_" in n]
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    x, t, r = _latents(6), torch.full((6,), 0.8), torch.full((6,), 0.2)

    _perturb_default_lora(model, seed=1)
    teacher.update(velocity)  # first update copies (d = 0)
    for n in names:
        assert torch.equal(params[n.replace(".default.", ".ema.")], params[n])
    for p, q in zip(teacher.e2.parameters(), model.time_text_embed_2.parameters()):
        assert torch.equal(p, q)
    assert teacher.current_decay == pytest.approx(0.45)
    with torch.no_grad():
        online_then = velocity(x, t, r, cond)

    ema_before = {n: params[n.replace(".default.", ".ema.")].detach().clone() for n in names}
    e2_before = [p.detach().clone() for p in teacher.e2.parameters()]
    _perturb_default_lora(model, seed=2)
    teacher_out = teacher.velocity(x, t, r, cond)
    torch.testing.assert_close(teacher_out, online_then, rtol=0, atol=0)  # still the copied weights
    with torch.no_grad():
        assert (velocity(x, t, r, cond) - online_then).abs().max() > 1e-5  # the online model moved
    # switching adapters left the active adapter and every requires_grad flag as they were
    assert {n: p.requires_grad for n, p in params.items()} == flags
    assert model.active_adapters() == ["default"]

    teacher.update(velocity)  # d = 0.45: ema = 0.45·ema + 0.55·default
    for n in names:
        expected = 0.45 * ema_before[n] + 0.55 * params[n].detach()
        torch.testing.assert_close(params[n.replace(".default.", ".ema.")], expected, rtol=1e-6, atol=1e-7)
    for p, q, b in zip(teacher.e2.parameters(), model.time_text_embed_2.parameters(), e2_before):
        torch.testing.assert_close(p, 0.45 * b + 0.55 * q.detach(), rtol=1e-6, atol=1e-7)
    assert teacher.current_decay == pytest.approx(0.45 + 0.55 * (0.9 - 0.45) / 2)

    state = copy.deepcopy(teacher.state_dict())
    teacher.update(velocity)
    teacher.load_state_dict(state)
    assert teacher.num_updates == 2 and teacher.current_decay == pytest.approx(state["current_decay"])
    restored = lora_state_dict(model, "ema", target_embedder=teacher.e2)
    assert set(restored) == set(state["ema"])
    assert all(torch.equal(restored[k], state["ema"][k]) for k in restored)


def test_ema_teacher_without_the_adapter_is_a_config_error(tiny_qwen_image):
    velocity = QwenImageVelocity(_lora_model(tiny_qwen_image, ema=False))
    with pytest.raises(ConfigError, match=r"model\.ema"):
        make_qwen_teacher("ema", velocity, 0.99)


def test_lora_frozen_teacher_is_the_initial_model(tiny_qwen_image, cond):
    model = _lora_model(tiny_qwen_image).eval()
    velocity = QwenImageVelocity(model)
    x, t, r = _latents(6), torch.full((6,), 0.7), torch.full((6,), 0.1)
    with torch.no_grad():
        initial = velocity(x, t, r, cond)
    teacher = make_qwen_teacher("frozen", velocity)
    assert isinstance(teacher, LoraFrozenTeacher) and teacher.rollout_uses_online
    _perturb_default_lora(model, seed=3)
    teacher.update(velocity)
    torch.testing.assert_close(teacher.velocity(x, t, r, cond), initial, rtol=0, atol=0)
    with torch.no_grad():
        assert (velocity(x, t, r, cond) - initial).abs().max() > 1e-5
    with active_adapter(model, None):
        assert all(m.disable_adapters for m in model.modules() if hasattr(m, "lora_A"))
    assert not any(m.disable_adapters for m in model.modules() if hasattr(m, "lora_A"))


def test_full_mode_ema_teacher_is_a_copy_with_its_own_e2(tiny_qwen_image, cond):
    """method.EmaTeacher deep-copies the adapter; the E2 hook must follow the copy, not the original."""
    model = load_twinflow_transformer(tiny_qwen_image, full_trainable=True).eval()
    velocity = QwenImageVelocity(model)
    teacher = make_qwen_teacher("ema", velocity, ema_decay=0.5)
    copied = teacher.module.transformer
    hooks = list(copied.time_text_embed._forward_hooks.values())
    assert [h.__self__ for h in hooks] == [copied]  # re-bound to the copy by deepcopy
    x, t, r = _latents(6), torch.full((6,), 0.9), torch.zeros(6)
    with torch.no_grad():
        initial = velocity(x, t, r, cond)
        for p in model.time_text_embed_2.parameters():
            p.add_(0.3)
    torch.testing.assert_close(teacher.velocity(x, t, r, cond), initial, rtol=0, atol=0)
    teacher.update(velocity)  # first update copies
    with torch.no_grad():
        torch.testing.assert_close(teacher.velocity(x, t, r, cond), velocity(x, t, r, cond), rtol=0, atol=0)


def test_merged_lora_equals_the_adapter_model_and_saves_as_twinflow(tiny_qwen_image, cond, tmp_path):
    model = _lora_model(tiny_qwen_image).eval()
    _perturb_default_lora(model, seed=4, scale=0.2)
    x, t, r = _latents(6), torch.full((6,), 0.9), torch.zeros(6)
    with torch.no_grad():
        with_adapter = QwenImageVelocity(model)(x, t, r, cond)
    merged = merge_lora(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    merged.save_pretrained(tmp_path / "merged")
    loaded = TwinFlowQwenImageTransformer2DModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(QwenImageVelocity(loaded)(x, t, r, cond), with_adapter, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# the TwinFlow objective through the adapter
# ---------------------------------------------------------------------------


def _objective_step(velocity, cond, uncond, teacher, seed=0):
    cfg = twinflow()
    ids = allocate_micro_batch(cfg.weights(), BatchLayout(6))
    x = _latents(6, seed=seed)
    teacher.update(velocity)
    out = TwinFlowObjective(cfg)(velocity, x, cond, ids, uncond=uncond, teacher=teacher,
                                 generator=torch.Generator().manual_seed(seed))
    out.loss.backward()
    return out


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_twinflow_objective_runs_forward_backward_through_the_adapter(tiny_qwen_image, text, cond, mode):
    model = (_lora_model(tiny_qwen_image, ema=True) if mode == "lora"
             else load_twinflow_transformer(tiny_qwen_image, full_trainable=True)).train()
    velocity = QwenImageVelocity(model)
    uncond = uncond_condition(text, 6, MAX_LEN)
    teacher = make_qwen_teacher("ema" if mode == "lora" else "self", velocity, 0.99)
    out = _objective_step(velocity, cond, uncond, teacher)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    means = out.means()
    for key in ("loss/one_step", "loss/near_diag", "loss/any_step", "loss/fake", "loss/rectify"):
        assert key in means and torch.isfinite(torch.tensor(means[key])), key
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    assert grads["time_text_embed_2.timestep_embedder.linear_1.weight"].abs().sum() > 0
    if mode == "full":
        assert grads["transformer_blocks.0.attn.to_q.weight"].abs().sum() > 0


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(tiny_qwen_image, text, cond, mode):
    uncond = uncond_condition(text, 6, MAX_LEN)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # LoRA A is drawn when the adapter is added
        if mode == "lora":
            model = load_twinflow_transformer(tiny_qwen_image, lora=LoraSettings(rank=4, alpha=4),
                                              gradient_checkpointing=checkpointing)
            _perturb_default_lora(model, seed=5)  # nonzero B so LoRA grads reach A too
        else:
            model = load_twinflow_transformer(tiny_qwen_image, full_trainable=True,
                                              gradient_checkpointing=checkpointing)
        assert model.gradient_checkpointing == checkpointing
        velocity = QwenImageVelocity(model.train())
        out = _objective_step(velocity, cond, uncond, make_qwen_teacher("self", velocity))
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                           if p.requires_grad and p.grad is not None}))
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-7)
    assert set(g0) == set(g1) and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# config and the encode side
# ---------------------------------------------------------------------------


def test_model_config_validation_names_the_field(tiny_qwen_image, tmp_path):
    ModelConfig(path=str(tiny_qwen_image)).validate()
    ModelConfig(path="Qwen/Qwen-Image").validate()
    cases = [
        (ModelConfig(path=""), r"model\.path"),
        (ModelConfig(path=str(tmp_path)), r"model\.path: .* not a diffusers pipeline folder"),
        (ModelConfig(path="./missing/folder"), r"model\.path: .* not a hub id"),
        (ModelConfig(path=str(tiny_qwen_image), mode="full", ema=True), r"model\.ema"),
        (ModelConfig(path=str(tiny_qwen_image), lora=LoraSettings(rank=0)), r"model\.lora\.rank"),
        (ModelConfig(path=str(tiny_qwen_image), dtype="int8"), r"model\.dtype"),
    ]
    for cfg, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            cfg.validate()


def test_build_velocity_model_from_config(tiny_qwen_image):
    cfg = ModelConfig(path=str(tiny_qwen_image), mode="lora", lora=LoraSettings(rank=2, alpha=2), ema=True,
                               gradient_checkpointing=True, dtype="bfloat16")
    velocity = build_velocity_model(cfg)
    model = velocity.transformer
    assert velocity.compute_dtype == torch.bfloat16 and model.gradient_checkpointing
    assert set(model.peft_config) == {"default", "ema"} and model.active_adapters() == ["default"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n or n.startswith("time_text_embed_2.") for n in trainable)
    full = build_velocity_model(ModelConfig(path=str(tiny_qwen_image), mode="full", dtype="float32",
                                                     gradient_checkpointing=False))
    assert all(p.requires_grad for p in full.parameters())


def test_encode_prompts_matches_the_pipeline_and_pads_with_a_mask(text):
    cond = encode_prompts(text, PROMPTS[:3], max_sequence_length=MAX_LEN)
    embeds, mask = text.encode_prompt(PROMPTS[:3], max_sequence_length=MAX_LEN)
    assert cond["prompt_embeds"].dtype == torch.float32 and cond["prompt_mask"].dtype == torch.long
    torch.testing.assert_close(cond["prompt_embeds"], embeds.float(), rtol=0, atol=0)
    assert torch.equal(cond["prompt_mask"], mask)
    lengths = cond["prompt_mask"].sum(1)
    assert lengths.max() == cond["prompt_embeds"].shape[1] and lengths.min() < lengths.max()
    # (text_encoder, tokenizer) works as well as a pipeline
    again = encode_prompts((text.text_encoder, text.tokenizer), PROMPTS[:3], max_sequence_length=MAX_LEN)
    assert torch.equal(again["prompt_embeds"], cond["prompt_embeds"])
    rows = split_prompt_embeds(cond)
    assert [r.shape[0] for r in rows] == lengths.tolist()
    collated = pad_prompt_embeds(rows)
    assert torch.equal(collated["prompt_mask"], cond["prompt_mask"])
    torch.testing.assert_close(collated["prompt_embeds"], cond["prompt_embeds"] * cond["prompt_mask"][..., None])
    full = encode_prompts(text, ["a red cat"], max_sequence_length=MAX_LEN)
    assert bool(full["prompt_mask"].all())  # encode_prompt returns None here; we return ones


def test_uncond_is_generate_an_image_expanded(text):
    assert UNCOND_PROMPT == "Generate an image."
    unc = uncond_condition(text, 3, MAX_LEN)
    one = encode_prompts(text, ["Generate an image."], max_sequence_length=MAX_LEN)
    assert unc["prompt_embeds"].shape[0] == 3
    for i in range(3):
        assert torch.equal(unc["prompt_embeds"][i], one["prompt_embeds"][0])


def test_latents_are_normalised_posterior_means_and_decode_inverts(tiny_qwen_image):
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage.from_pretrained(tiny_qwen_image, subfolder="vae")
    mean, std = [0.1, -0.2, 0.3, 0.0], [0.5, 2.0, 1.5, 1.0]
    vae.register_to_config(latents_mean=mean, latents_std=std)
    pixels = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = encode_images(vae, pixels)
    assert vae_scale_factor(vae) == 4  # the tiny VAE downsamples twice (the real one three times: 8)
    assert latents.shape == (2, 4, 8, 12) and latents.dtype == torch.float32
    assert latent_size(vae, 32, 48) == (8, 12)
    with torch.no_grad():
        raw = vae.encode(pixels[:, :, None]).latent_dist.mean[:, :, 0]
    m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    torch.testing.assert_close(latents, (raw - m) / s)
    torch.testing.assert_close(denormalise_latents(vae, latents), raw)
    images = decode_latents(vae, latents)
    with torch.no_grad():
        ref = vae.decode(raw[:, :, None]).sample[:, :, 0]
    assert images.shape == (2, 3, 32, 48) and 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(images, (ref / 2 + 0.5).clamp(0, 1))
    with pytest.raises(ValueError, match="multiple of 8"):
        encode_images(vae, pixels[:, :, :, :44])
