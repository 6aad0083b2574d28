"""When the next fan-out may start: a throttle that follows what a fan-out costs.

A fixed window (the seed's 25 ms leading-edge throttle) holds the second of two close changes
for the whole window even when the system is idle, and under real load it does not know how
much of the loop a fan-out takes. This policy measures instead: after a fan-out that cost
``c`` seconds of CPU (encoding plus every woken client's send), the next one may start
``c * (1/share - 1)`` later, so fan-out takes at most ``share`` of a core; an isolated change
after a quiet spell goes out at once, churn merges into fewer, larger fan-outs. The gap never
exceeds ``cap`` (``VDM_ACTIVE_REQUESTS_SSE_THROTTLE``): when a fan-out is so costly that the
share would need a longer gap, bounded latency wins over the share.

The cost is CPU time, not wall time: on a busy machine the operating system deschedules the
service in the middle of a fan-out, and counting that time as cost made the gap grow exactly
when other processes took the core (measured side by side with vandamme-proxy on two cores:
fan-outs to 200 clients took several times their CPU in wall time).

Pure and clock-free: callers pass the times, so the decision is unit-tested directly.
"""

from __future__ import annotations

import math

# Fan-out may use at most this share of a core while changes keep coming. A half, not a
# quarter: with 200 clients a fan-out costs ~5 ms of CPU, and a quarter made the next change
# wait up to 15 ms. Side by side (bench e2e vs vandamme, 200 clients, 50 in flight, two
# runs each, alternating): row gone p50 8.1-9.7 ms at 0.25, 7.0-7.2 ms at 0.5; row with its
# model p99 29-35 ms vs 23-26 ms. Under heavy churn the cap bounds the gap either way.
FANOUT_SHARE = 0.5


class AdaptiveThrottle:
    def __init__(self, cap: float, share: float = FANOUT_SHARE) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError("share must be in (0, 1]")
        self.cap = max(0.0, cap)
        self.share = share
        self.cost = 0.0  # CPU seconds the last fan-out took
        self.last_end = -math.inf  # when it finished (the caller's monotonic clock)

    def gap(self) -> float:
        """The quiet time owed after the last fan-out before the next one may start."""
        return min(self.cap, self.cost * (1.0 / self.share - 1.0))

    def delay(self, now: float) -> float:
        """How long a change noticed at ``now`` waits before its fan-out (0: go now)."""
        return max(0.0, self.last_end + self.gap() - now)

    def record(self, ended: float, cost: float) -> None:
        """A fan-out finished at ``ended`` (monotonic) after ``cost`` seconds of CPU."""
        self.cost = max(0.0, cost)
        self.last_end = ended
