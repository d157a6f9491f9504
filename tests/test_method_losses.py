"""Per-block loss options (twinflow.block_loss) and what the robust loss minimises on a multimodal target.

Near-diagonal rows with t − r < δ regress F on T = F − clip(F − v). When x_t is compatible with
several velocities (a two-point posterior here: v = a with probability 3/4, v = b with 1/4), flow
matching needs the minimiser to be the posterior mean E[v | x_t]. l2 without clip gives exactly that;
Barron (α = 1, per-row unit-norm gradients) gives a geometric median, and the clip biases l2 too.
"""

import pytest
import torch

from twinflow.config.errors import ConfigError
from twinflow.method import Block, BatchLayout, BlockWeights, TwinFlowObjective, allocate_micro_batch, rcgm_target, twinflow
from twinflow.method.config import BlockLoss, BlockLosses
from twinflow.method.losses import sample_loss
from twinflow.models.toy import ToyMLP

A, B = 0.0, 3.0  # the two velocities; |A − B| > 2 so the ±1 clip is active


def _minimiser(kind: str, clip: float | None) -> float:
    """Gradient descent of mean_i ℓ(p, T_i) over the constant prediction p, T_i = rcgm_target(p, v_i)."""
    v = torch.tensor([A, A, A, B]).reshape(4, 1)
    p = torch.full((1, 1), 1.0, requires_grad=True)
    t = torch.full((4,), 0.5)
    opt = torch.optim.SGD([p], lr=0.05)
    steps = 4000
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)  # settle, don't jitter (Barron's unit steps)
    for _ in range(steps):
        f = p.expand(4, 1)
        target = rcgm_target(f.detach(), torch.zeros(4, 1), t, t, v, None, None, 0.01, 1, clip)  # t − r = 0 < δ
        loss = sample_loss(kind, f, target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    return p.detach().item()


def test_l2_without_clip_finds_the_posterior_mean_and_the_released_recipe_does_not():
    mean, median = 0.75 * A + 0.25 * B, A
    assert _minimiser("l2", None) == pytest.approx(mean, abs=1e-3)
    # Barron (α = 1, c = 1e-3): the gradient of each row has unit norm, so p settles where 3 rows pull
    # one way and 1 the other cannot balance: at the median (up to c), far from the mean.
    assert _minimiser("barron", 1.0) == pytest.approx(median, abs=0.02)
    assert _minimiser("barron", None) == pytest.approx(median, abs=0.02)
    # l2 with the clip: 3·clip(p − A) + clip(p − B) = 0 at p = 1/3 (the B row's pull saturates at −1).
    assert _minimiser("l2", 1.0) == pytest.approx(1 / 3, abs=1e-3)


def _objective(block_loss: BlockLosses, **kw):
    cfg = twinflow()
    cfg.block_weights, cfg.enhance_ratio, cfg.block_loss = BlockWeights(1, 1, 1, 1), 0.0, block_loss
    for k, v in kw.items():
        setattr(cfg, k, v)
    return TwinFlowObjective(cfg)


def _run(obj, seed=0):
    torch.manual_seed(0)
    net = ToyMLP(width=32, depth=2)
    x = torch.randn(32, 2) * 3
    ids = allocate_micro_batch(obj.cfg.weights(), BatchLayout(32))
    out = obj(net, x, None, ids, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(out.loss, list(net.parameters()))
    return out.means(), torch.cat([g.flatten() for g in grads])


def test_block_loss_settings_reach_the_loss_of_their_block_only():
    base, g_base = _run(_objective(BlockLosses()))
    everywhere_l2 = BlockLosses(*(BlockLoss(loss="l2") for _ in range(4)))
    a, g_a = _run(_objective(everywhere_l2))
    b, g_b = _run(_objective(BlockLosses(), loss="l2"))
    assert a == pytest.approx(b) and torch.allclose(g_a, g_b)  # per block l2 everywhere == twinflow.loss: l2

    near = BlockLosses(near_diag=BlockLoss(loss="l2", clip=False))
    c, g_c = _run(_objective(near))
    assert c["loss/near_diag"] != pytest.approx(base["loss/near_diag"], rel=1e-3)  # that block changed ...
    for key in ("loss/one_step", "loss/any_step", "loss/fake", "loss/rectify"):
        assert c[key] == pytest.approx(base[key], rel=1e-6), key  # ... no other block's did
    assert not torch.allclose(g_c, g_base)

    unclipped = BlockLosses(any_step=BlockLoss(clip=False))
    d, _ = _run(_objective(unclipped))
    assert d["loss/any_step"] > base["loss/any_step"] * 1.05  # x scaled by 3: residuals beyond the ±1 clip
    assert d["loss/near_diag"] == pytest.approx(base["loss/near_diag"], rel=1e-6)


def test_block_loss_fields_are_validated_by_name():
    cfg = twinflow()
    cfg.block_loss = BlockLosses(fake=BlockLoss(loss="huber"))
    with pytest.raises(ConfigError, match=r"^twinflow\.block_loss\.fake\.loss: must be one of barron, l2"):
        cfg.validate()
    assert Block.FAKE in Block  # the four blocks each have a setting
    assert {b.name.lower() for b in Block} == {"one_step", "near_diag", "any_step", "fake"}


class CallCounter(torch.nn.Module):
    """Wraps a network and records the batch size of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.rows = net, []

    def forward(self, x, t, r, cond=None):
        self.rows.append(x.shape[0])
        return self.net(x, t, r, cond)


def test_real_velocity_term_on_plain_flow_matching_scales_the_loss_by_one_plus_w():
    """On FM rows (r = t, target v, l2, unclipped, no time weight) the tutorial's term ℓ(F(x_t, t, t), v) is the
    FM loss itself: with weight w the loss and its gradient are exactly (1 + w)× those without it, and the rows
    ride in the one pass with gradient (2B rows, one call)."""
    from twinflow.method import fm
    torch.manual_seed(0)
    net = ToyMLP(width=32, depth=2)
    x = torch.randn(16, 2)
    ids = allocate_micro_batch(fm().weights(), BatchLayout(16))
    outs, grads = [], []
    for w in (0.0, 0.5):
        cfg = fm()
        cfg.real_velocity_weight = w
        counted = CallCounter(net)
        out = TwinFlowObjective(cfg)(counted, x, None, ids, generator=torch.Generator().manual_seed(3))
        outs.append(out)
        grads.append(torch.autograd.grad(out.loss, list(net.parameters())))
        assert counted.rows == ([16] if w == 0 else [32])
    assert outs[1].loss.item() == pytest.approx(1.5 * outs[0].loss.item(), rel=1e-6)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, 1.5 * b, rtol=1e-5, atol=1e-7)
    m = outs[1].means()
    assert m["loss/real_velocity"] == pytest.approx(m["loss/near_diag"], rel=1e-6)
    assert "loss/real_velocity" not in outs[0].means()


def test_real_velocity_term_covers_real_rows_only_and_is_never_clipped():
    torch.manual_seed(0)
    net = ToyMLP(width=32, depth=2)
    cfg = twinflow()
    cfg.enhance_ratio = 0.0
    cfg.real_velocity_weight = 1.0
    ids = allocate_micro_batch(cfg.weights(), BatchLayout(24))
    counted = CallCounter(net)
    # x scaled so |F − v| is far beyond the ±1 clip: a clipped term would stay near 1 per element
    out = TwinFlowObjective(cfg)(counted, 10 * torch.randn(24, 2), None, ids, generator=torch.Generator().manual_seed(0))
    n_real = int((ids != Block.FAKE).sum())
    # one call (the pass with gradient) sees every row and then the real rows again; no other call grows
    assert n_real < 24 and counted.rows.count(24 + n_real) == 1 and max(counted.rows) == 24 + n_real
    assert out.means()["loss/real_velocity"] > 20
    cfg.real_velocity_weight = -1.0
    with pytest.raises(ConfigError, match=r"^twinflow\.real_velocity_weight: must be >= 0"):
        cfg.validate()
