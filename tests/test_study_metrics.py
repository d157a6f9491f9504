"""The study's metrics on cases whose answers are known."""

import math

import numpy as np
import pytest
import torch

from twinflow.study.datasets import load_digits, make_mixture
from twinflow.study.metrics import (DigitsJudge, frechet_distance, knn_precision, mode_stats, sliced_w2,
                                    within_class_distance)


def test_sliced_w2_is_zero_on_itself_and_matches_a_known_shift():
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    assert sliced_w2(x, x) == pytest.approx(0.0, abs=1e-12)
    # a shift s moves every 1-D projection by θ·s: SW2 = sqrt(E[(θ·s)²]) = |s|/√2 in 2-D
    shifted = x + torch.tensor([1.0, 0.0])
    assert sliced_w2(x, shifted, directions=4096) == pytest.approx(1 / math.sqrt(2), rel=0.03)


def test_sliced_w2_rejects_unequal_sizes():
    with pytest.raises(ValueError, match="equal-size"):
        sliced_w2(torch.zeros(5, 2), torch.zeros(6, 2))


def test_mode_stats_detect_dropped_modes_and_imbalance():
    mix = make_mixture(8, seed=0)
    g = torch.Generator().manual_seed(1)
    full = mix.sample(20_000, g)
    s = mode_stats(full, mix)
    assert s["mode_coverage"] == 1.0 and s["mode_balance"] > 0.97 and s["off_mode"] < 0.03
    half = full[torch.cdist(full, mix.centres).argmin(1) < 4]  # only modes 0..3
    s = mode_stats(half, mix)
    assert s["mode_coverage"] == 0.5 and s["mode_balance"] < 0.7
    s = mode_stats(torch.zeros(1000, 2), mix)  # collapsed to the mean: every sample is off-mode
    assert s["off_mode"] == 1.0 and s["mode_coverage"] == 0.0


def test_knn_precision_recall_separate_quality_from_coverage():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(600, 4))
    assert knn_precision(real, real) == 1.0
    collapsed = np.repeat(real[:1], 600, axis=0) + 1e-3 * rng.normal(size=(600, 4))
    assert knn_precision(real, collapsed) == 1.0  # every sample is realistic...
    assert knn_precision(collapsed, real) < 0.05  # ...but almost no real sample is covered
    far = real + 10.0
    assert knn_precision(real, far) == 0.0


def test_frechet_and_diversity_basics():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3)) + np.array([2.0, 0, 0])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)  # |Δμ|² with equal covariances
    labels = np.repeat([0, 1], 2000)
    assert within_class_distance(np.zeros((4000, 3)), labels) == 0.0


def test_digits_judge_scores_real_digits_as_real_and_class_means_as_collapsed():
    data = load_digits()
    judge = DigitsJudge.fit(data)
    real = judge.score(data.images.numpy(), data.labels.numpy())
    assert real["frechet"] == pytest.approx(0.0, abs=1e-6) and real["recall"] == 1.0 and real["accuracy"] > 0.95
    means = torch.stack([data.images[data.labels == c].mean(0) for c in range(10)])
    blurry = means[data.labels].numpy()  # a perfectly mode-collapsed conditional generator
    s = judge.score(blurry, data.labels.numpy())
    assert s["accuracy"] > 0.9  # the classifier is fooled...
    assert s["recall"] < 0.2 and s["diversity"] < 1e-6 and s["frechet"] > 5 * judge.real_floor()["frechet"]
