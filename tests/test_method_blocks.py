"""Block partition from λ and its allocation over ranks and accumulation steps."""

import itertools

import pytest
import torch

from twinflow.config import ConfigError
from twinflow.method import (Block, BatchLayout, BlockWeights, LossNorm, allocate_micro_batch, block_counts,
                             weights_from_lambda)
from twinflow.method.blocks import min_global_batch


def test_lambda_one_third_gives_one_sixth_each_to_one_step_and_fake():
    assert block_counts(weights_from_lambda(1 / 3), 12) == [2, 4, 4, 2]
    assert block_counts(weights_from_lambda(1 / 3), 6) == [1, 2, 2, 1]
    assert block_counts(weights_from_lambda(1 / 3), 24) == [4, 8, 8, 4]


def test_lambda_extremes_and_explicit_reference_mix():
    assert block_counts(weights_from_lambda(0.0), 8) == [0, 4, 4, 0]
    assert block_counts(weights_from_lambda(1.0), 8) == [4, 0, 0, 4]
    assert block_counts(BlockWeights(1, 1, 1, 1), 8) == [2, 2, 2, 2]
    # 1:1:1:1 is lambda = 1/2 under the platform's definition
    assert block_counts(weights_from_lambda(0.5), 8) == [2, 2, 2, 2]


def test_counts_always_sum_to_the_batch():
    for lam, n in itertools.product([0.1, 0.2, 1 / 3, 0.45, 0.7], range(1, 40)):
        w = weights_from_lambda(lam)
        if n < min_global_batch(w):
            with pytest.raises(ConfigError):
                block_counts(w, n)
            continue
        c = block_counts(w, n)
        assert sum(c) == n and min(c) >= 1
        assert abs(c[0] + c[3] - lam * n) < 2  # the realised TwinFlow share is λ to within rounding


def test_too_small_global_batch_is_a_clear_config_error():
    with pytest.raises(ConfigError) as err:
        block_counts(weights_from_lambda(1 / 3), 5)
    msg = str(err.value)
    # At 5 rows the rounding gives every block a row but not the mix: the message says exactly that.
    assert "global batch 5" in msg and "round to 1/2/1/1" in msg and "at least 6" in msg
    with pytest.raises(ConfigError) as err:
        block_counts(weights_from_lambda(1 / 3), 2)
    # At 2 rows near_diag and any_step do get one row each; only one_step and fake get none.
    assert "(one_step, fake would get no row)" in str(err.value)
    assert min_global_batch(weights_from_lambda(1 / 3)) == 6
    # λ typed as 0.3333 gives one-step and fake shares of 0.9999 rows at 6: that is one row, not a 7th row.
    assert min_global_batch(weights_from_lambda(0.3333)) == 6
    assert block_counts(weights_from_lambda(0.3333), 6) == [1, 2, 2, 1]
    assert min_global_batch(weights_from_lambda(0.1)) == 20
    assert min_global_batch(BlockWeights(1, 1, 1, 1)) == 4  # the reference's ">= 4 per GPU"
    assert min_global_batch(BlockWeights(0, 1, 0, 0)) == 1


@pytest.mark.parametrize("micro, world, accum", [(1, 4, 3), (2, 3, 1), (4, 2, 2), (12, 1, 1), (1, 2, 6)])
def test_every_optimizer_step_sees_the_global_proportions(micro, world, accum):
    weights = weights_from_lambda(1 / 3)
    layout = BatchLayout(micro, world, accum)
    expected = block_counts(weights, layout.global_batch)
    per_block_per_micro = [c / layout.micro_batches for c in expected]
    for step in range(5):
        seen = torch.zeros(4, dtype=torch.long)
        for rank, k in itertools.product(range(world), range(accum)):
            ids = allocate_micro_batch(weights, layout, rank, k, step)
            assert len(ids) == micro
            counts = torch.bincount(ids, minlength=4)
            seen += counts
            for b in range(4):  # each micro-batch gets every block's share within one row
                assert abs(counts[b].item() - per_block_per_micro[b]) < 1
        assert seen.tolist() == expected


def test_leftover_rows_rotate_across_ranks_with_the_step():
    # 1 row per GPU, 6 GPUs: each rank holds one block per step and must see all of them over steps
    weights, layout = weights_from_lambda(1 / 3), BatchLayout(1, 6, 1)
    held = {int(allocate_micro_batch(weights, layout, rank=0, step=s)[0]) for s in range(6)}
    assert held == {b.value for b in Block}


def test_single_micro_batch_is_the_in_batch_split():
    ids = allocate_micro_batch(BlockWeights(1, 1, 1, 1), BatchLayout(8))
    assert ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_global_loss_norm_divides_by_average_rows_per_micro_batch():
    weights, layout = weights_from_lambda(1 / 3), BatchLayout(2, 3, 2)  # G = 12, M = 6
    norm = LossNorm.global_(weights, layout)
    assert norm.rows == pytest.approx(2.0)
    assert norm.one_step_rows == pytest.approx(2 / 6)
