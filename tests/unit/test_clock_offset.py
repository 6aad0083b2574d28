"""A worker's offset to Redis's clock, from round trips that returned Redis's TIME."""

from __future__ import annotations

import math

import pytest

from vdm_hub.shared.clock_offset import SAMPLES, ClockOffset


def test_a_clock_that_agrees_with_redis_keeps_its_own_time() -> None:
    clock = ClockOffset()
    for t in (100.0, 102.0, 104.0):
        # Redis's TIME truncated to the millisecond, read halfway through a 4 ms round trip.
        clock.observe(t, t + 0.004, math.floor((t + 0.002) * 1000))
    assert clock.offset == 0.0


def test_a_clock_90s_behind_is_corrected_by_the_shortest_round_trip() -> None:
    clock = ClockOffset()
    clock.observe(10.0, 10.8, (10.1 + 90) * 1000)  # a slow trip: the reply came late
    assert clock.offset == pytest.approx(89.7, abs=0.01)
    clock.observe(12.0, 12.002, (12.001 + 90) * 1000)
    assert clock.offset == pytest.approx(90.0, abs=0.002)
    clock.observe(14.0, 14.9, (14.2 + 90) * 1000)  # slow again: the short one still wins
    assert clock.offset == pytest.approx(90.0, abs=0.002)


def test_a_clock_step_is_followed_once_the_old_samples_are_gone() -> None:
    clock = ClockOffset()
    for i in range(SAMPLES):
        clock.observe(float(i), i + 0.001, (i + 0.0005 - 30) * 1000)
    assert clock.offset == pytest.approx(-30.0, abs=0.002)
    for i in range(SAMPLES):  # the host's clock was stepped: now it agrees with Redis
        clock.observe(100.0 + i, 100.0 + i + 0.002, (100.001 + i) * 1000)
    assert clock.offset == 0.0
