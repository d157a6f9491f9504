"""The TwinFlow objective: FM/RCGM presets, the RCGM target, L_rectify's direction, signed time."""

import math

import pytest
import torch
from torch import nn

from twinflow.method import (Block, BatchLayout, BlockWeights, EmaTeacher, TwinFlowObjective, allocate_micro_batch,
                             fm, rcgm, rcgm_target, twinflow)
from twinflow.method.losses import barron, time_weight
from twinflow.method.objective import rectify_delta, rectify_target
from twinflow.models.toy import DigitsNet, ToyMLP


def test_fm_preset_is_exactly_plain_flow_matching():
    torch.manual_seed(0)
    net = ToyMLP(width=32, depth=2)
    x = torch.randn(16, 2)
    ids = allocate_micro_batch(fm().weights(), BatchLayout(16))
    assert (ids == Block.NEAR_DIAG).all()

    out = TwinFlowObjective(fm())(net, x, None, ids, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out.loss, list(net.parameters()))

    # hand-written FM on the same draw: t ~ U(0,1), (an r-draw the FM rows ignore), z ~ N(0, I)
    g = torch.Generator().manual_seed(3)
    t = torch.rand(16, generator=g)
    torch.rand(16, generator=g)
    z = torch.randn(16, 2, generator=g)
    x_t = t[:, None] * z + (1 - t[:, None]) * x
    ref = ((net(x_t, t, t) - (z - x)) ** 2).mean()
    ref_grads = torch.autograd.grad(ref, list(net.parameters()))

    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


class PointMassExact(nn.Module):
    """The exact average velocity when the data is the single point x0: F(x, t, r) = (x − x0)/t."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, t, r, cond=None):
        return (x - self.x0) / t[:, None]


@pytest.mark.parametrize("order", [1, 2])
def test_rcgm_residual_vanishes_for_the_exact_solution(order):
    x0 = torch.tensor([[0.5, -1.0]], dtype=torch.float64)  # float64: Φ divides by δ
    net = PointMassExact(x0)
    z = torch.tensor([[1.2, 0.3], [-0.4, 2.0], [0.1, 0.1]], dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64)
    r = torch.tensor([0.0, 0.2, 0.295], dtype=torch.float64)  # last row: t − r < δ → the flow-matching branch
    x_t = t[:, None] * z + (1 - t[:, None]) * x0
    v = z - x0
    f = net(x_t, t, r)
    target = rcgm_target(f, x_t, t, r, v, net, None, delta=0.01, order=order, clip=1.0)
    torch.testing.assert_close(target, f, atol=1e-9, rtol=0)


def test_rcgm_target_hand_computed_for_a_linear_model():
    # F(x, t, r) = a·x for every (t, r); N = 1, δ = 0.1, no clipping:
    # x_s = x_t − δv,  D = (s − r)·a·x_s,  Φ = [(t − r)·a·x_t − D − δv]/δ,  T = a·x_t − Φ
    a, x_t, v, t, r, delta = 0.3, 2.0, 0.5, 0.8, 0.2, 0.1
    s = t - delta
    x_s = x_t - delta * v
    phi = ((t - r) * a * x_t - (s - r) * a * x_s - delta * v) / delta
    expected = a * x_t - phi  # = 0.6 − (0.36 − 0.2925 − 0.05)/0.1 = 0.425

    def lin(x, tt, rr, cond):
        return a * x

    got = rcgm_target(torch.tensor([[a * x_t]]), torch.tensor([[x_t]]), torch.tensor([t]), torch.tensor([r]),
                      torch.tensor([[v]]), lin, None, delta=delta, order=1, clip=None)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.425, abs=1e-9)
    clipped = rcgm_target(torch.tensor([[a * x_t]]), torch.tensor([[x_t]]), torch.tensor([t]), torch.tensor([r]),
                          torch.tensor([[v]]), lin, None, delta=delta, order=1, clip=0.1)
    assert clipped.item() == pytest.approx(a * x_t - 0.1, abs=1e-6)  # Φ = 0.175 clipped to 0.1


class SignedOffset(nn.Module):
    """F = p on the one-step query (1, 0); elsewhere a fixed field that differs by sign of t."""

    def __init__(self, dim=3):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(dim))
        self.real = torch.tensor([0.2, -0.1, 0.05])
        self.fake = torch.tensor([-0.3, 0.4, 0.0])

    def forward(self, x, t, r, cond=None):
        one = ((t == 1) & (r == 0)).float()[:, None]
        other = torch.where((t < 0)[:, None], self.fake.expand_as(x), self.real.expand_as(x))
        return one * self.p.expand_as(x) + (1 - one) * other


def test_rectify_gradient_moves_the_one_step_sample_along_plus_delta_v():
    net = SignedOffset()
    x_fake = torch.zeros(4, 3)
    dv = rectify_delta(net, x_fake, None, clip=1.0, generator=torch.Generator().manual_seed(0))
    expected_dv = net.fake - net.real
    torch.testing.assert_close(dv, expected_dv.expand(4, 3))

    f_one = net(torch.zeros(4, 3), torch.ones(4), torch.zeros(4))
    loss = ((f_one - rectify_target(f_one, dv)) ** 2).mean()
    loss.backward()
    # gradient descent on p moves x_fake = z − F(z, 1, 0) = z − p by −(−grad) ... i.e. along +Δv
    step = -net.p.grad  # change of p under a unit descent step
    move_of_x_fake = -step
    cos = torch.nn.functional.cosine_similarity(move_of_x_fake, expected_dv, dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-6)


def test_rectify_term_in_the_full_objective_pushes_along_delta_v():
    net = SignedOffset()
    cfg = twinflow()
    cfg.block_weights = BlockWeights(1, 0, 0, 0)
    cfg.one_step_rcgm = False  # isolate L_rectify on the one-step rows
    cfg.enhance_ratio = 0.0
    ids = torch.zeros(8, dtype=torch.long)
    out = TwinFlowObjective(cfg)(net, torch.randn(8, 3), None, ids, generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    cos = torch.nn.functional.cosine_similarity(net.p.grad, net.fake - net.real, dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-5)
    assert out.means()["dv_norm"] > 0


@pytest.mark.parametrize("net", [ToyMLP(), DigitsNet()], ids=["mlp2d", "digits"])
def test_negative_time_conditioning_differs_from_positive(net):
    torch.manual_seed(0)
    for p in net.parameters():  # the digits net zero-initialises its residual branches
        nn.init.normal_(p, std=0.2)
    dim = 2 if isinstance(net, ToyMLP) else 64
    x = torch.randn(8, dim)
    cond = None if isinstance(net, ToyMLP) else torch.arange(8) % 10
    tau = torch.full((8,), 0.4)
    pos, neg = net(x, tau, tau, cond), net(x, -tau, -tau, cond)
    assert torch.isfinite(neg).all()
    assert (pos - neg).abs().max() > 1e-3


def test_every_block_contributes_and_stats_are_reported():
    torch.manual_seed(0)
    net = DigitsNet(width=64, depth=2)
    labels = torch.arange(24) % 10
    out = TwinFlowObjective(twinflow())(net, torch.randn(24, 64), labels,
                                        allocate_micro_batch(twinflow().weights(), BatchLayout(24)),
                                        uncond=labels.roll(1), generator=torch.Generator().manual_seed(0))
    means = out.means()
    for key in ("loss/one_step", "loss/near_diag", "loss/any_step", "loss/fake", "loss/rectify", "dv_norm",
                "fake_norm", "loss/total"):
        assert key in means and math.isfinite(means[key])
    out.loss.backward()
    assert all(p.grad is not None for p in net.parameters())


def test_enhancement_without_uncond_is_a_clear_error():
    net = ToyMLP(width=16, depth=1)
    cfg = rcgm()
    cfg.enhance_ratio = 0.5
    with pytest.raises(ValueError, match="enhance_ratio > 0 needs an unconditional"):
        TwinFlowObjective(cfg)(net, torch.randn(6, 2), None, allocate_micro_batch(cfg.weights(), BatchLayout(6)),
                               generator=torch.Generator().manual_seed(0))


def test_fake_rows_are_one_step_samples_of_the_online_model_without_grad():
    net = SignedOffset()
    with torch.no_grad():
        net.p.copy_(torch.tensor([1.0, 2.0, 3.0]))
    cfg = twinflow()
    cfg.block_weights, cfg.enhance_ratio = BlockWeights(0, 0, 0, 1), 0.0
    out = TwinFlowObjective(cfg)(net, torch.zeros(5, 3), None, torch.full((5,), 3),
                                 generator=torch.Generator().manual_seed(0))
    # x_fake = z' − p, so its RMS is close to that of (z' − p), far from the data (zeros)
    assert out.means()["fake_norm"] > 1.5
    out.loss.backward()
    assert net.p.grad is None or net.p.grad.abs().sum() == 0  # fakes carry no gradient into F(·, 1, 0)


def test_barron_is_about_per_sample_rmse_and_time_weight_endpoints():
    pred, tgt = torch.zeros(2, 4), torch.tensor([[1.0] * 4, [2.0] * 4])
    # ≈ RMSE · sqrt(1 + 1e-8/c²): the released code's c² + 1e-8 denominator (0.5 % at c = 1e-3)
    torch.testing.assert_close(barron(pred, tgt), torch.tensor([1.0, 2.0]) * math.sqrt(1.01), rtol=1e-5, atol=0)
    t, r = torch.tensor([1.0, 0.5, 0.3, -0.4]), torch.tensor([0.0, 0.0, 0.3, -0.4])
    w = time_weight(t, r, "tan")
    assert w[0].item() == pytest.approx(1.0 + math.tan(0.0), abs=1e-6)
    assert w[1].item() == pytest.approx(1 + math.tan(0.5 * math.pi / 2.5), abs=1e-5)
    assert w[2].item() == pytest.approx(1 + math.tan(math.pi / 2.5), abs=1e-4)


def test_ema_teacher_warm_up_copies_first_then_lags():
    net = nn.Linear(2, 2)
    ema = EmaTeacher(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)  # d = 0: a copy
    torch.testing.assert_close(ema.module.weight, net.weight)
    assert ema.current_decay == pytest.approx(0.45)
    with torch.no_grad():
        net.weight.fill_(3.0)
    ema.update(net)  # d = 0.45
    torch.testing.assert_close(ema.module.weight, torch.full((2, 2), 0.45 * 1 + 0.55 * 3))
    assert 0.45 < ema.current_decay < 0.9
