"""DMD2 in LoRA form on the real (tiny, random-weight) Qwen-Image transformer: one base holds the student
adapter, the fake-score adapter and — adapters off — the real score; full form holds three copies."""

from __future__ import annotations

import pytest
import torch

from twinflow.method.dmd import dmd2
from twinflow.models.lora import active_adapter
from twinflow.plan.calibrate import build_rig
from twinflow.plan.measure import tensor_bytes
from twinflow.plan.method_rig import FAKE_ADAPTER, MethodSteps, lora_dmd
from twinflow.plan.presets import tiny


def _outputs(fn, rig):
    b = rig.latents.shape[0]
    t = torch.full((b,), 0.6)
    with torch.no_grad():
        return fn(rig.latents, t, t, rig.cond).float()


def test_lora_dmd_keeps_one_base_and_its_real_score_is_the_base_with_adapters_off():
    rig = build_rig(tiny())
    tr = rig.transformer
    base_params = {n: p.detach().clone() for n, p in tr.named_parameters() if "lora_" not in n}
    adapter_numel = sum(p.numel() for n, p in tr.named_parameters() if "lora_" in n)
    total_before = sum(p.numel() for p in tr.parameters())
    with active_adapter(tr, None):
        base_out = _outputs(rig.velocity, rig)

    objective, fake_params = lora_dmd(dmd2(), rig.velocity, tr, lr=1e-3)
    # One base: adding the fake score adds exactly one more adapter's worth of parameters, no copy.
    assert sum(p.numel() for p in tr.parameters()) == total_before + adapter_numel
    assert sum(p.numel() for p in fake_params) == adapter_numel
    torch.testing.assert_close(_outputs(objective.real, rig), base_out)

    student = {n: p.detach().clone() for n, p in tr.named_parameters() if ".default." in n and "lora_" in n}
    fake = {n: p.detach().clone() for n, p in tr.named_parameters() if f".{FAKE_ADAPTER}." in n}
    for _ in range(2):
        out = objective(rig.velocity, rig.latents, rig.cond, generator=rig.generator)
        out.loss.backward()
        rig.optimizer.step()
        rig.optimizer.zero_grad(set_to_none=True)
    now = dict(tr.named_parameters())
    # Both adapters trained, each by its own optimizer; the base never moved ...
    assert max((now[n] - v).abs().max().item() for n, v in student.items()) > 0
    assert max((now[n] - v).abs().max().item() for n, v in fake.items()) > 0
    # (E2, time_text_embed_2, is the student's and trains with it)
    assert all(torch.equal(now[n], v) for n, v in base_params.items() if "time_text_embed_2" not in n)
    # ... so the real score is still exactly the pretrained base.
    torch.testing.assert_close(_outputs(objective.real, rig), base_out)
    # The student's optimizer holds only the student (+ E2) and the fake's only the fake adapter.
    student_opt = {id(p) for g in rig.optimizer.param_groups for p in g["params"]}
    assert not student_opt & {id(p) for p in fake_params}


def test_full_form_dmd_holds_two_more_copies_and_lora_form_one_more_adapter():
    sizes = {}
    for mode in ("full", "lora"):
        inputs = tiny()
        inputs.model.mode = mode
        rig = build_rig(inputs)
        steps = MethodSteps(rig, {"dmd2": dmd2()}, lora=mode == "lora")
        steps.step("dmd2")  # creates the fake score's optimizer state
        weights = tensor_bytes(rig.transformer)["params"]
        sizes[mode] = steps.extra_static_bytes("dmd2") / weights
    # full: fake copy (weights + 2 AdamW moments) + real copy = 4 × the weights, less the moments of the
    # few weights no forward reaches (AdamW makes state only for parameters that got a gradient);
    # LoRA: the fake adapter's two moments, a small share of the one base.
    assert 3.5 < sizes["full"] <= 4.0, sizes
    assert sizes["lora"] < 0.5, sizes


def test_fake_adapter_training_trains_the_fake_adapter_alone_and_restores_every_flag():
    """Under DeepSpeed the fake score's backward runs outside the engine: inside ``fake_adapter_training``
    no student weight (adapter or E2) may receive a gradient, and every flag comes back afterwards."""
    from twinflow.models.lora import add_fake_adapter, fake_adapter_training

    rig = build_rig(tiny())
    tr = rig.transformer
    fake_params = add_fake_adapter(tr)
    before = {n: p.requires_grad for n, p in tr.named_parameters()}
    assert not any(p.requires_grad for p in fake_params) and any(before.values())
    b = rig.latents.shape[0]
    t = torch.full((b,), 0.4)
    with fake_adapter_training(tr):
        trainable = {n for n, p in tr.named_parameters() if p.requires_grad}
        assert trainable == {n for n, p in tr.named_parameters() if ".fake." in n and "lora_" in n}
        rig.velocity(rig.latents, t, t, rig.cond).float().pow(2).mean().backward()
    assert {n: p.requires_grad for n, p in tr.named_parameters()} == before
    got = {n.replace(".fake.", ".") for n, p in tr.named_parameters() if ".fake." in n and p.grad is not None}
    assert got and all(p.grad is None for n, p in tr.named_parameters() if ".fake." not in n)
    # the fake adapter gets a gradient wherever the student's does in its own step (the last block's text
    # stream feeds nothing, so neither adapter's layers there do)
    rig.velocity(rig.latents, t, t, rig.cond).float().pow(2).mean().backward()
    assert got == {n.replace(".default.", ".") for n, p in tr.named_parameters() if ".default." in n and p.grad is not None}


def test_the_fake_score_state_survives_a_checkpoint_round_trip(tmp_path):
    """train/fake_score.py's state (LoRA fake adapter, DMD2's GAN head on the transformer's last hidden
    state, their AdamW) through train/state.py's JSON + safetensors files: reloading it undoes later fake
    steps exactly, optimizer step counts included."""
    import dataclasses

    from twinflow.train.config import TrainConfig
    from twinflow.train.fake_score import FakeScore
    from twinflow.train.state import TrainState, read_shared_state, write_shared_state

    rig = build_rig(tiny())
    cfg = TrainConfig(method="dmd2")
    cfg = dataclasses.replace(cfg, dmd2=dataclasses.replace(cfg.dmd2, fake_updates=2, gan_weight=5e-3))
    fake = FakeScore(cfg, rig.velocity.inner, model_path="unused in LoRA mode", world=1)
    head = [n for n in fake.names if n.startswith("gan_head.")]
    assert head and len(fake.names) > len(head)  # the head trains beside the fake adapter
    stats = fake.objective(rig.velocity, rig.latents, rig.cond, generator=rig.generator).means()
    assert stats["loss/gan"] > 0 and stats["loss/gan_head"] > 0
    write_shared_state(tmp_path, TrainState(step=1), None, 1, "step_00000001", {}, fake.state_dict())
    saved = {n: p.detach().clone() for n, p in zip(fake.names, fake.params)}
    fake.objective(rig.velocity, rig.latents, rig.cond, generator=rig.generator)  # two more fake steps
    assert max((p - saved[n]).abs().max().item() for n, p in zip(fake.names, fake.params)) > 0

    fake.load_state_dict(read_shared_state(tmp_path)["fake_score"])
    assert all(torch.equal(p, saved[n]) for n, p in zip(fake.names, fake.params))
    steps = {float(s["step"]) for s in fake.optimizer.state.values()}
    assert steps == {2.0}  # the AdamW state of the checkpoint (2 fake steps), not of the 4 taken since


@pytest.mark.parametrize("gan_weight", [0.0, 5e-3], ids=["dmd2", "dmd2-gan"])
def test_full_form_fake_score_trains_a_copy_beside_a_frozen_real_copy(tiny_qwen_image, gan_weight):
    """train/fake_score.py, full mode: the fake and real scores are two more whole models loaded like the
    student; a DMD2 step trains the fake copy only (by its own optimizer), the real copy stays the
    pretrained weights, and the student is left for its trainer to step (its gradient is there)."""
    import dataclasses

    from twinflow.models.loading import build_velocity_model
    from twinflow.train.config import TrainConfig
    from twinflow.train.fake_score import FakeScore

    cfg = TrainConfig(method="dmd2")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(tiny_qwen_image), mode="full",
                                                             ema=False, dtype="float32"),
                              dmd2=dataclasses.replace(cfg.dmd2, fake_updates=2, gan_weight=gan_weight))
    student = build_velocity_model(cfg.model)
    fake = FakeScore(cfg, student, str(tiny_qwen_image), world=1)
    real, fake_net = fake.real_module, fake.fake_module
    n_student = sum(p.numel() for p in student.parameters())
    assert sum(p.numel() for p in real.parameters()) == sum(p.numel() for p in fake_net.parameters()) == n_student
    assert not any(p.requires_grad for p in real.parameters())
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    assert all(torch.equal(p, start[n]) for n, p in fake_net.named_parameters())  # all three start equal

    torch.manual_seed(0)
    x = torch.randn(4, student.transformer.config.in_channels // 4, 8, 8)  # 2×2 packing: in_channels = 4C
    cond = {"prompt_embeds": torch.randn(4, 6, student.transformer.config.joint_attention_dim),
            "prompt_mask": torch.ones(4, 6, dtype=torch.long)}
    out = fake.objective(student, x, cond, generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    assert all(torch.equal(p, start[n]) for n, p in real.named_parameters())
    assert max((p - start[n]).abs().max().item() for n, p in fake_net.named_parameters()) > 0
    assert all(torch.equal(p, start[n]) for n, p in student.named_parameters())  # not stepped here ...
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())  # ... but has a grad
    assert {float(s["step"]) for s in fake.optimizer.state.values()} == {2.0}
    if gan_weight:  # the head trained with the fake copy; the student's GAN pass left no gradient on either
        assert "loss/gan" in out.means() and fake.discriminator is not None
        assert all(p.grad is None for p in fake.params)
