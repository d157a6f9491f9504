"""Training-seed aggregation of the study (study/seeds.py): means, both spreads, seed-paired ratios."""

import pytest

from twinflow.study.seeds import combine, ratios_to_reference


def _scores(sw2: float, eval_std: float) -> dict:
    return {"nfe_1": {"sliced_w2": sw2, "sliced_w2_std": eval_std, "sampler": "few"},
            "nfe_100": {"sliced_w2": sw2 / 2, "sliced_w2_std": eval_std, "sampler": "few"}}


def test_a_cell_is_the_mean_over_training_seeds_with_both_spreads():
    cell = combine([_scores(0.10, 0.01), _scores(0.16, 0.03), _scores(0.13, 0.02)])
    row = cell["nfe_1"]
    assert row["sliced_w2"] == pytest.approx(0.13)
    assert row["sliced_w2_train_std"] == pytest.approx(0.024494897, rel=1e-6)  # population std of the three
    assert row["sliced_w2_std"] == pytest.approx(0.02)  # eval-seed spread, averaged
    assert row["sliced_w2_per_seed"] == [0.10, 0.16, 0.13] and row["train_seeds"] == 3 and row["sampler"] == "few"
    one = combine([_scores(0.1, 0.01)])["nfe_1"]
    assert one["sliced_w2_train_std"] == 0.0 and one["train_seeds"] == 1


def test_ratios_pair_seeds_and_remove_the_real_vs_real_floor():
    fm = combine([{"nfe_100": {"sliced_w2": v}} for v in (0.05, 0.07)])
    tf = combine([{"nfe_1": {"sliced_w2": v}} for v in (0.10, 0.10)])
    r = ratios_to_reference({"fm": fm, "twinflow": tf}, {"sliced_w2": 0.03}, "sliced_w2")
    got = r["twinflow"]["nfe_1"]
    # seed by seed: 0.10/0.05 = 2, 0.10/0.07 = 1.4286 -> mean 1.7143 (not 0.10/0.06 = 1.667)
    assert got["ratio"] == pytest.approx((2 + 0.10 / 0.07) / 2)
    assert got["ratio_std"] == pytest.approx(abs(2 - 0.10 / 0.07) / 2)
    assert got["floor_corrected"] == pytest.approx(((0.07 / 0.02) + (0.07 / 0.04)) / 2)
    assert r["fm"]["nfe_100"]["ratio"] == pytest.approx(1.0) and r["fm"]["nfe_100"]["ratio_std"] == 0
    assert ratios_to_reference({"twinflow": tf}, {}, "sliced_w2") == {}  # no FM 100-NFE cell: no ratios
    # a reference at or below the floor on any seed (digits' Fréchet floor is above good models): no
    # floor-corrected figure at all, not a division by ~0 (the full digits study printed 5e12 before)
    below = ratios_to_reference({"fm": fm, "twinflow": tf}, {"sliced_w2": 0.06}, "sliced_w2")["twinflow"]["nfe_1"]
    assert below["floor_corrected"] is None and below["floor_corrected_std"] is None
    assert below["ratio"] == pytest.approx(got["ratio"])
