"""The rivals' objectives on cases with closed-form answers: MeanFlow / sCM (finite-difference tangent)
and DMD2 / VSD (distribution matching on Gaussians whose velocity fields are known exactly)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from twinflow.config.errors import ConfigError
from twinflow.config.tree import to_dict
from twinflow.method.dmd import DMDConfig, DMDObjective, dmd2, matching_gradient, vsd
from twinflow.method.meanflow import (MeanFlowConfig, MeanFlowObjective, SCMConfig, SCMObjective, meanflow_target,
                                      scm_residual, tangent)
from twinflow.method.objectives import method_from_dict, needs_teacher_model, single_network_objective
from twinflow.method.path import expand_time, interpolate


class Linear(nn.Module):
    """F(x, t, r) = x·A + b·t + c·r: its total derivative along dx/dt = v is v·A + b, exactly."""

    def __init__(self, dim: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = nn.Parameter(torch.randn(dim, dim, generator=g))
        self.b = nn.Parameter(torch.randn(dim, generator=g))
        self.c = nn.Parameter(torch.randn(dim, generator=g))

    def forward(self, x, t, r, cond=None):
        return x @ self.A + t[:, None] * self.b + r[:, None] * self.c


def gaussian_velocity(x_t: torch.Tensor, t: torch.Tensor, mu: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    """E[z − x | x_t] for x ~ N(mu, s²I), z ~ N(0, I), x_t = t·z + (1 − t)·x (closed form)."""
    tt = expand_time(t, x_t)
    var = (1 - tt) ** 2 * s**2 + tt**2
    x_hat = mu + (1 - tt) * s**2 / var * (x_t - (1 - tt) * mu)
    return (x_t - x_hat) / tt


def test_tangent_is_exact_on_a_linear_network_and_gives_the_meanflow_identity():
    net = Linear()
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)
    t = torch.rand(64, generator=g) * 0.98 + 0.01
    r = t * torch.rand(64, generator=g)
    with torch.no_grad():
        expected = v @ net.A + net.b
        d = tangent(net, x, t, r, v, None, eps=5e-3)
    torch.testing.assert_close(d, expected, rtol=1e-4, atol=1e-4)
    target = meanflow_target(v, t, r, d)
    torch.testing.assert_close(target, v - (t - r)[:, None] * expected, rtol=1e-4, atol=1e-4)
    # At the ends of the interval the difference turns one-sided and stays exact.
    edge = torch.tensor([1.0, 0.999]), torch.tensor([1.0, 0.999])
    d_edge = tangent(net, x[:2], edge[0], edge[1], v[:2], None, eps=5e-3)
    torch.testing.assert_close(d_edge, expected[:2], rtol=1e-3, atol=1e-3)


def test_the_exact_average_velocity_is_a_fixed_point_of_meanflow():
    """Point-mass data x0: every trajectory is straight, the average velocity (x_t − x0)/t for any r,
    and its total derivative along the flow is 0, so the target is F itself."""
    x0 = torch.tensor([[0.5, -1.0]])

    def exact(x, t, r, cond=None):
        return (x - x0) / t[:, None]

    g = torch.Generator().manual_seed(2)
    x_t = interpolate(x0.expand(32, 2), torch.randn(32, 2, generator=g), t := torch.rand(32, generator=g) * 0.9 + 0.05)
    r = t * torch.rand(32, generator=g)
    v = exact(x_t, t, t)
    d = tangent(exact, x_t, t, r, v, None, eps=1e-3)
    assert d.abs().max() < 1e-3
    torch.testing.assert_close(meanflow_target(v, t, r, d), exact(x_t, t, r), atol=1e-3, rtol=1e-3)


def test_scm_residual_is_meanflow_residual_at_r_zero():
    net = Linear()
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(16, 3, generator=g), torch.randn(16, 3, generator=g)
    t, r = torch.rand(16, generator=g) * 0.9 + 0.05, torch.zeros(16)
    with torch.no_grad():
        f = net(x, t, r)
        d = tangent(net, x, t, r, v, None, eps=5e-3)
    torch.testing.assert_close(scm_residual(f, v, t, d), f - meanflow_target(v, t, r, d))
    # The warm-up scales only the tangent term: at 0 it is flow matching's residual F − v.
    torch.testing.assert_close(scm_residual(f, v, t, d, warmup=0.0), f - v)


def _two_gaussians(n=4096, seed=4):
    g = torch.Generator().manual_seed(seed)
    mu_real, mu_fake = torch.tensor([1.0, -0.5]), torch.tensor([-0.5, 0.5])
    x = mu_fake + torch.randn(n, 2, generator=g)  # student samples ~ N(mu_fake, I)
    t = torch.rand(n, generator=g) * 0.96 + 0.02
    x_t = interpolate(x, torch.randn(n, 2, generator=g), t)
    return x, x_t, t, mu_real, mu_fake


@pytest.mark.parametrize("weighting", ["dmd", "vsd"])
def test_distribution_matching_gradient_points_from_the_fake_mean_to_the_real_one(weighting):
    x, x_t, t, mu_real, mu_fake = _two_gaussians()
    v_real, v_fake = gaussian_velocity(x_t, t, mu_real), gaussian_velocity(x_t, t, mu_fake)
    grad = matching_gradient(x, x_t, t, v_real, v_fake, weighting).mean(0)
    direction = mu_fake - mu_real  # descending −grad must move samples toward mu_real
    cos = torch.dot(grad, direction) / (grad.norm() * direction.norm())
    assert cos > 0.99, cos
    # Same distribution, same field: no gradient at all.
    same = matching_gradient(x, x_t, t, v_fake, v_fake, weighting)
    assert same.abs().max() == 0


class Shift(nn.Module):
    """Student G(z) = z + θ (F(z, 1, 0) = −θ), or a fake score: the exact field of N(θ, I)."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta))

    def forward(self, x, t, r, cond=None):
        if bool((t == 1).all() and (r == 0).all()):
            return -self.theta.expand_as(x)
        return gaussian_velocity(x, t, self.theta)


@pytest.mark.parametrize("cfg", [dmd2(), vsd()], ids=["dmd2", "vsd"])
def test_dmd_moves_a_shifted_student_onto_the_real_distribution(cfg):
    """Real data N(mu, I); student N(θ, I) from θ = (−2, 2). The fake score learns the student's mean by
    flow matching on its samples; the matching gradient then carries θ to mu."""
    mu = torch.tensor([1.0, -1.0])
    student, fake = Shift([-2.0, 2.0]), Shift([-2.0, 2.0])
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    objective = DMDObjective(cfg, lambda x, t, r, c: gaussian_velocity(x, t, mu), fake,
                             torch.optim.Adam(fake.parameters(), lr=0.05))
    g = torch.Generator().manual_seed(5)
    for _ in range(300):
        out = objective(student, torch.zeros(256, 2), None, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert (student.theta.detach() - mu).abs().max() < 0.15, student.theta
    assert (fake.theta.detach() - student.theta.detach()).abs().max() < 0.3  # the fake tracked the student
    assert set(out.means()) >= {"loss/dm", "loss/fake_score", "loss/total"}


@pytest.mark.parametrize("objective", [MeanFlowObjective(MeanFlowConfig()), SCMObjective(SCMConfig(tangent_warmup=0))],
                         ids=["meanflow", "scm"])
def test_tangent_objectives_leave_the_exact_solution_with_zero_gradient(objective):
    """Point-mass data, the exact average-velocity network with velocity: teacher — nothing to learn."""
    objective.cfg.velocity = "teacher"
    x0 = torch.tensor([0.5, -1.0])

    class Exact(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x, t, r, cond=None):
            return self.scale * (x - x0) / t[:, None].clamp_min(1e-3)

    net = Exact()

    class Teach:
        rollout_uses_online = False

        def velocity(self, x, t, r, cond):
            return net(x, t, r).detach()

    out = objective(net, x0.expand(128, 2).clone(), None, teacher=Teach(), generator=torch.Generator().manual_seed(6))
    out.loss.backward()
    assert abs(float(net.scale.grad)) < 1e-3


def test_rival_configs_validate_and_survive_a_dict_round_trip():
    for cfg in (MeanFlowConfig(), SCMConfig(), dmd2(), vsd()):
        back = method_from_dict(to_dict(cfg))
        assert back == cfg and type(back) is type(cfg)
    with pytest.raises(ConfigError, match=r"dmd\.t_range"):
        DMDConfig(t_range=(0.5, 0.2)).validate()
    with pytest.raises(ConfigError, match=r"meanflow\.fd_eps"):
        MeanFlowConfig(fd_eps=0.0).validate()
    with pytest.raises(TypeError, match="DMDObjective"):
        single_network_objective(dmd2())
    with pytest.raises(ValueError, match="choose one of"):
        method_from_dict({"name": "gan"})
    # Who needs a pretrained model to start from (the study pretrains one for them).
    assert needs_teacher_model(dmd2()) and needs_teacher_model(vsd())
    assert needs_teacher_model(SCMConfig(velocity="teacher"))
    assert not needs_teacher_model(SCMConfig()) and not needs_teacher_model(MeanFlowConfig())


@pytest.mark.parametrize("steps", [1, 2, 8])
def test_the_meanflow_sampler_follows_the_exact_average_velocity_to_the_data(steps):
    """Point-mass data: jumps along the exact average velocity land on x0 at every step count; the exported
    pipeline carries this sampler for a MeanFlow run (method_sampler), the released grid otherwise."""
    from twinflow.method.sampler import few_step, mean_flow, method_sampler, sample

    x0 = torch.tensor([[0.5, -1.0]])

    def exact(x, t, r, cond=None):
        return (x - x0) / t[:, None]

    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(7))
    out = sample(exact, z, None, mean_flow(steps))
    torch.testing.assert_close(out, x0.expand(64, 2), atol=1e-5, rtol=0)
    assert method_sampler("meanflow", steps) == mean_flow(steps)
    assert method_sampler("scm", steps) == few_step(steps) == method_sampler("twinflow", steps)


@pytest.mark.parametrize("gan_weight", [1.0, 0.0], ids=["gan", "no-gan"])
def test_the_gan_term_alone_carries_the_student_to_the_real_data(gan_weight):
    """DMD2's GAN term by itself: the real score *is* the fake score, so the distribution-matching
    gradient is exactly zero and only the GAN term can move the student. Real data N((1, 0), I) in the
    batch, student N(θ, I) from θ = (−2, 0); the head on the fake network's last hidden state learns to
    tell noised real rows from noised student rows, and the generator loss carries θ onto the data.
    Without the GAN term nothing moves."""
    from twinflow.method.dmd import Discriminator
    from twinflow.models.toy import ToyMLP

    torch.manual_seed(0)
    mu = torch.tensor([1.0, 0.0])
    student, fake = Shift([-2.0, 0.0]), ToyMLP(2, width=64, depth=2)
    disc = Discriminator(fake)
    params = list(fake.parameters()) + list(disc.parameters())
    cfg = DMDConfig(gan_weight=gan_weight, gan_head_weight=1.0, fake_updates=2)
    objective = DMDObjective(cfg, real=fake, fake=fake, fake_opt=torch.optim.Adam(params, lr=3e-3),
                             fake_params=params, discriminator=disc)
    opt = torch.optim.Adam(student.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        out = objective(student, mu + torch.randn(256, 2, generator=g), None, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    stats = out.means()
    assert stats["loss/dm"] == 0.0
    if gan_weight:
        assert (student.theta.detach() - mu).abs().max() < 0.35, student.theta  # measured (0.96, 0.18)
        # near equilibrium the head can no longer tell the two apart: its loss is close to 2·ln 2
        assert abs(stats["loss/gan_head"] - 2 * math.log(2)) < 0.1 and stats["loss/gan"] > 0
        # the student's backward reached neither the fake score nor the head (autograd.grad to x_t only)
        assert all(p.grad is None for p in params)
    else:
        assert torch.equal(student.theta.detach(), torch.tensor([-2.0, 0.0]))
        assert "loss/gan" not in stats and "loss/gan_head" not in stats


def test_gan_settings_validate_and_need_a_head_on_a_named_output_layer():
    from twinflow.method.dmd import Discriminator

    with pytest.raises(ConfigError, match=r"^dmd.gan_weight: must be >= 0"):
        DMDConfig(gan_weight=-1.0).validate()
    with pytest.raises(ConfigError, match=r"^dmd.gan_head_weight: must be positive"):
        DMDConfig(gan_head_weight=0.0).validate()
    fake = Shift([0.0, 0.0])
    opt = torch.optim.Adam(fake.parameters())
    with pytest.raises(ValueError, match="needs a Discriminator"):
        DMDObjective(DMDConfig(gan_weight=0.1), real=fake, fake=fake, fake_opt=opt)
    with pytest.raises(ValueError, match=r"^dmd.gan_weight: .*Shift names no output_layer"):
        Discriminator(fake)
    from twinflow.models.toy import DigitsNet

    net = DigitsNet(width=32, depth=1)
    disc = Discriminator(net)
    with pytest.raises(ValueError, match="must be among fake_params"):
        DMDObjective(DMDConfig(gan_weight=0.1), real=net, fake=net, fake_opt=torch.optim.Adam(net.parameters()),
                     discriminator=disc)
    net(torch.zeros(3, 64), torch.ones(3), torch.ones(3), torch.zeros(3, dtype=torch.long))
    assert disc.logits().shape == (3,)  # one logit per row, from the hidden state the last call saw


def test_every_statistic_an_objective_returns_is_one_the_training_job_reduces_and_logs():
    """train/loop.py all-reduces a fixed list of statistics (STAT_KEYS) and stops a run on any other, so
    a new objective's statistic must be added there: check every objective here, the GAN term on."""
    from twinflow.method.config import twinflow, twinflow_unbiased
    from twinflow.method.dmd import Discriminator
    from twinflow.method.meanflow import MeanFlowConfig, SCMConfig
    from twinflow.method import BatchLayout, allocate_micro_batch
    from twinflow.method.teacher import make_teacher
    from twinflow.models.toy import ToyMLP
    from twinflow.train.loop import STAT_KEYS

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, generator=g)
    seen: set = set()
    for cfg in (twinflow(), twinflow_unbiased(), MeanFlowConfig(), SCMConfig(tangent_warmup=0)):
        net = ToyMLP(2, width=16, depth=1, num_classes=3)
        objective = single_network_objective(cfg)
        teacher = make_teacher("self", net)
        ids = allocate_micro_batch(cfg.weights(), BatchLayout(16)) if hasattr(cfg, "weights") else None
        labels = torch.randint(0, 3, (16,), generator=g)
        seen |= set(objective(net, x, labels, ids, uncond=labels.flip(0), teacher=teacher, generator=g).stats)
    fake = ToyMLP(2, width=16, depth=1)
    disc = Discriminator(fake)
    params = list(fake.parameters()) + list(disc.parameters())
    dmd = DMDObjective(DMDConfig(gan_weight=0.1, regression_weight=0.1, regression_steps=2), real=fake, fake=fake,
                       fake_opt=torch.optim.Adam(params), fake_params=params, discriminator=disc)
    seen |= set(dmd(ToyMLP(2, width=16, depth=1), x, None, generator=g).stats)
    assert {"loss/gan", "loss/gan_head", "loss/regression", "loss/meanflow", "loss/near_diag"} <= seen
    assert seen <= set(STAT_KEYS), seen - set(STAT_KEYS)
