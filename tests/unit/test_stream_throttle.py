"""The fan-out throttle's decision, with explicit times (no clock, no timing asserts)."""

from __future__ import annotations

import pytest

from vdm_hub.services.stream.throttle import AdaptiveThrottle


def test_an_isolated_change_goes_out_at_once() -> None:
    throttle = AdaptiveThrottle(cap=0.025, share=0.25)
    assert throttle.delay(now=100.0) == 0.0  # nothing was ever sent
    throttle.record(ended=100.001, cost=0.001)  # a cheap fan-out
    assert throttle.delay(now=101.0) == 0.0  # a quiet spell later: no wait


def test_churn_right_after_a_costly_fanout_waits_and_merges() -> None:
    throttle = AdaptiveThrottle(cap=0.025, share=0.25)
    throttle.record(ended=10.004, cost=0.004)  # 4 ms of fan-out
    # At most a quarter of the loop: 4 ms of work owes 12 ms of quiet.
    assert throttle.delay(now=10.004) == pytest.approx(0.012)
    assert throttle.delay(now=10.010) == pytest.approx(0.006)
    assert throttle.delay(now=10.016) == 0.0


def test_a_cheap_fanout_owes_almost_nothing_even_under_churn() -> None:
    throttle = AdaptiveThrottle(cap=0.025, share=0.25)
    throttle.record(ended=5.0001, cost=0.0001)
    assert throttle.delay(now=5.0001) == pytest.approx(0.0003)


def test_the_gap_never_exceeds_the_cap() -> None:
    throttle = AdaptiveThrottle(cap=0.025, share=0.25)
    throttle.record(ended=0.5, cost=0.5)  # a huge fan-out
    assert throttle.gap() == 0.025
    assert throttle.delay(now=0.5) == pytest.approx(0.025)


def test_a_zero_cap_sends_every_change_at_once() -> None:
    throttle = AdaptiveThrottle(cap=0.0)
    throttle.record(ended=0.2, cost=0.2)
    assert throttle.delay(now=0.2) == 0.0


def test_share_is_validated() -> None:
    with pytest.raises(ValueError, match="share"):
        AdaptiveThrottle(cap=0.025, share=0.0)
