"""How far Redis's clock is from this process's, measured on calls that return Redis's ``TIME``.

Liveness is judged on Redis's clock inside the scripts. Times a worker stamps itself (a row's
``start_time``) are read by the stream service against its own clock: a worker whose clock is
90 s behind would show every duration 90 s too long and drop out of the 60 s summary window.
The worker therefore stamps them on Redis's clock: its own time plus this offset.

The estimate is NTP's clock filter in miniature: each round trip that returned Redis's time
gives a sample ``redis_time - midpoint(send, receive)`` whose error is at most half the round
trip (plus the millisecond ``TIME`` is truncated to); of the last few samples the one with the
shortest round trip wins, and an offset within its own error is taken as zero (a host whose
clock agrees with Redis's keeps its own timestamps exactly).
"""

from __future__ import annotations

import time
from collections import deque

SAMPLES = 8  # heartbeats (2 s apart by default): a clock step is followed within ~16 s
RESOLUTION_S = 0.001  # the scripts return Redis's TIME in whole milliseconds


class ClockOffset:
    def __init__(self) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=SAMPLES)
        self.offset = 0.0  # seconds to add to time.time() to read Redis's clock

    def observe(self, sent: float, received: float, redis_ms: float) -> None:
        """One round trip: ``sent``/``received`` on this clock (epoch s), Redis's in epoch ms."""
        rtt = max(0.0, received - sent)
        self._samples.append((rtt, redis_ms / 1000.0 - (sent + received) / 2))
        best_rtt, best = min(self._samples)
        self.offset = best if abs(best) > best_rtt / 2 + RESOLUTION_S else 0.0

    def now(self) -> float:
        """Redis's clock, as well as this process can tell (epoch s)."""
        return time.time() + self.offset
