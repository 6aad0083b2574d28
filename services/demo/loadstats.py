"""Counters and latency percentiles for the load generator, in bounded memory.

Latencies go into a fixed-size uniform reservoir (Vitter's algorithm R): exact percentiles
for runs shorter than the reservoir, a fair sample for the endless demo traffic.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

RESERVOIR_SIZE = 20_000


class Reservoir:
    def __init__(self, size: int = RESERVOIR_SIZE, rng: random.Random | None = None) -> None:
        self.size = size
        self.count = 0
        self._values: list[float] = []
        self._rng = rng or random.Random(0)

    def add(self, value: float) -> None:
        self.count += 1
        if len(self._values) < self.size:
            self._values.append(value)
            return
        slot = self._rng.randrange(self.count)
        if slot < self.size:
            self._values[slot] = value

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile, ``q`` in 0..100; None before the first value."""
        if not self._values:
            return None
        ordered = sorted(self._values)
        rank = max(1, -(-len(ordered) * q // 100))  # ceil without floats drifting
        return ordered[min(len(ordered), int(rank)) - 1]


@dataclass
class Progress:
    """What the ``on_progress`` hook gets, once per interval."""

    elapsed: float
    sent: int
    ok: int
    failed: int
    cancelled: int
    in_flight: int
    rps: float  # requests finished per second over the last interval
    waiting: int = 0  # of in_flight: not yet written to a connection (queued in this process)

    def line(self) -> str:
        return (
            f"load: {self.elapsed:6.1f}s sent={self.sent} ok={self.ok} failed={self.failed} "
            f"in_flight={self.in_flight} rps={self.rps:.1f} waiting={self.waiting}"
        )


@dataclass
class LoadStats:
    sent: int = 0
    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # reason -> count
    cancelled: int = 0  # cut short by stop() or the drain limit; neither ok nor failed
    bytes_in: int = 0
    elapsed: float = 0.0
    latency: Reservoir = field(default_factory=Reservoir)  # seconds, successful requests
    # Seconds from handing a request to the client until its headers were being written: time
    # spent queued in this process (pool, connect, event loop), not at the target.
    send_wait: Reservoir = field(default_factory=Reservoir)
    max_waiting: int = 0  # most requests queued in this process at once

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    @property
    def finished(self) -> int:
        return self.ok + self.failed_total

    def summary_line(self) -> str:
        rps = self.finished / self.elapsed if self.elapsed > 0 else 0.0

        def ms(q: float) -> str:
            value = self.latency.percentile(q)
            return "-" if value is None else f"{value * 1000:.1f}ms"

        line = (
            f"load summary: sent={self.sent} ok={self.ok} failed={self.failed_total} "
            f"cancelled={self.cancelled} elapsed={self.elapsed:.2f}s rps={rps:.1f} "
            f"p50={ms(50)} p95={ms(95)} p99={ms(99)}"
        )
        wait = self.send_wait.percentile(50), self.send_wait.percentile(99)
        if wait[0] is not None and wait[1] is not None:
            line += (
                f" queued_here: p50={wait[0] * 1000:.1f}ms p99={wait[1] * 1000:.1f}ms"
                f" max={self.max_waiting}"
            )
        if self.failed:
            reasons = " ".join(f"{name}={n}" for name, n in self.failed.most_common())
            line += f" failures: {reasons}"
        return line
