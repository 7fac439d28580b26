"""B7's sweeps: short measurements are repeated until each log has had its time."""

from __future__ import annotations

from bench.scale import MAX_TRIALS, _trials


def _sweep(least: int, seconds: float, took: dict[str, float]) -> int:
    """Run the sweeps as B7 does, each log's measurement taking ``took[log]``; how many."""
    spent = dict.fromkeys(took, 0.0)
    count = 0
    for _ in _trials(least, seconds, spent):
        for log, each in took.items():
            spent[log] += each
        count += 1
    return count


def test_long_measurements_stop_at_the_least_count() -> None:
    assert _sweep(3, 0.5, {"small": 2.0, "big": 2.0}) == 3


def test_short_measurements_repeat_until_the_slower_log_has_had_its_time() -> None:
    # 30 ms on one log, 50 ms on the other: until both add up to 0.5 s.
    assert _sweep(3, 0.5, {"small": 0.05, "big": 0.03}) == 17


def test_the_sweeps_are_bounded_however_short_a_measurement_is() -> None:
    assert _sweep(3, 0.5, {"small": 0.0, "big": 0.0}) == MAX_TRIALS


def test_no_time_asked_is_the_least_count() -> None:
    assert _sweep(5, 0.0, {"small": 0.001, "big": 0.001}) == 5
