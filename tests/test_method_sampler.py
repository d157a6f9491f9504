"""The any-step sampler: grids, determinism, Euler equivalence, styles."""

import pytest
import torch

from twinflow.method import SamplerConfig, few_step, ode, sample, time_grid
from twinflow.models.toy import ToyMLP


def test_released_grids():
    torch.testing.assert_close(time_grid(SamplerConfig(steps=2, gap=(0.001, 0.6))),
                               torch.tensor([0.999, 0.6, 0.0], dtype=torch.float64))
    torch.testing.assert_close(time_grid(few_step(1)), torch.tensor([0.999, 0.0], dtype=torch.float64))
    g4 = time_grid(few_step(4))
    torch.testing.assert_close(g4, torch.tensor([0.999, 0.833, 0.667, 0.5, 0.0], dtype=torch.float64),
                               atol=1e-3, rtol=0)
    g100 = time_grid(ode(100))
    assert len(g100) == 101 and g100[0] == pytest.approx(0.999) and g100[-1] == 0
    assert (g100[:-1] > g100[1:]).all()


def test_kumaraswamy_warp_moves_the_interior_points():
    plain = time_grid(SamplerConfig(steps=4, gap=(0.001, 0.0)))
    warped = time_grid(SamplerConfig(steps=4, gap=(0.001, 0.0), kumaraswamy=(1.17, 0.8, 1.1)))
    assert warped[0] < 1 and warped[-1] == 0
    assert not torch.allclose(plain[1:-1], warped[1:-1])


def test_deterministic_given_a_seed_and_stochastic_otherwise():
    net = ToyMLP(width=32, depth=2)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    cfg = few_step(4)
    a = sample(net, noise, None, cfg, torch.Generator().manual_seed(1))
    b = sample(net, noise, None, cfg, torch.Generator().manual_seed(1))
    c = sample(net, noise, None, cfg, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_mul_style_without_noise_is_euler_on_the_velocity():
    net = ToyMLP(width=32, depth=2)
    x = torch.randn(10, 2)
    cfg = ode(5)
    grid = time_grid(cfg)
    ref = x.double()
    for i in range(5):
        t = torch.full((10,), float(grid[i]))
        ref = ref + (grid[i + 1] - grid[i]) * net(ref.float(), t, t).double()
    torch.testing.assert_close(sample(net, x, None, cfg), ref.float(), rtol=1e-5, atol=1e-5)


def test_one_nfe_few_style_is_the_endpoint_inversion():
    net = ToyMLP(width=32, depth=2)
    z = torch.randn(10, 2)
    t = torch.full((10,), 0.999)
    expected = z - 0.999 * net(z, t, torch.zeros(10))
    torch.testing.assert_close(sample(net, z, None, few_step(1)), expected, rtol=1e-5, atol=1e-5)


def test_per_row_generators_make_each_row_independent_of_its_batch():
    net = ToyMLP(width=32, depth=2)
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    batch = sample(net, noise, None, few_step(4), [torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    alone = sample(net, noise[1:2], None, few_step(4), [torch.Generator().manual_seed(8)])
    torch.testing.assert_close(batch[1:2], alone)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sample(net, noise, None, few_step(4), [torch.Generator(), torch.Generator()])
