"""A value recomputed at most once per period, however many callers ask for it.

For the polling endpoints: a thousand dashboards polling ``/metrics/summary`` cost one
computation per period, not one each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PeriodicMemo(Generic[T]):
    def __init__(self, compute: Callable[[], T], period: float) -> None:
        self._compute = compute
        self.period = period
        self._value: T | None = None
        self._until = 0.0
        self.computed = 0

    def get(self, now: float | None = None) -> T:
        now = time.monotonic() if now is None else now
        if self._value is None or now >= self._until:
            self._value = self._compute()
            self._until = now + self.period
            self.computed += 1
        return self._value
