"""tests/lanes.py, the two-lane runner behind `make test`: how the lanes' exit codes combine."""

from __future__ import annotations

from lanes import NO_TESTS, combined_exit


def test_a_failing_lane_fails_the_run_and_an_empty_lane_fails_only_a_full_run():
    assert combined_exit({"ray": 0, "cpu": 0}, selected=False) == 0
    assert combined_exit({"ray": 1, "cpu": 0}, selected=False) == 1
    assert combined_exit({"ray": 0, "cpu": 2}, selected=True) == 2
    assert combined_exit({"ray": NO_TESTS, "cpu": 0}, selected=False) == NO_TESTS  # a marker lost the Ray tests
    assert combined_exit({"ray": NO_TESTS, "cpu": 0}, selected=True) == 0  # `-k` picked CPU tests only
    assert combined_exit({"ray": NO_TESTS, "cpu": NO_TESTS}, selected=True) == NO_TESTS
