"""Rolling statistics of finished requests, read from the capped ``P:completed`` stream.

On start the recent past is rebuilt with XREVRANGE (so charts survive a restart of the stream
service), then an XREAD BLOCK loop follows the stream from the newest id seen. Statistics are
computed once per tick (``VDM_ACTIVE_REQUESTS_SSE_INTERVAL``), never per entry: ingest only
appends to a window deque and a time bucket.

Payload of :meth:`RollingStats.summary` (also the ``stats`` SSE event and ``/metrics/summary``)::

    {"timestamp": epoch_s, "window_s": seconds the rates cover (<= 60), "step_s": series step,
     "fleet": {"requests_per_s", "error_rate", "p50_ms", "p95_ms", "p99_ms",
               "ttft_p50_ms", "ttft_p95_ms", "completed", "errors", "cancelled",
               "client_closed", "in_flight"},
     "by_worker": {worker_id: {same keys}}, "by_model": {model: {same keys}},
     "series": [{"t", "in_flight", "requests_per_s", "error_rate", "errors", "cancelled",
                 "client_closed", "p50_ms", "p95_ms", "p99_ms", "ttft_p50_ms",
                 "ttft_p95_ms"}],                  # oldest first, one per step, ~10 min
     "recent": [CompletedEntry, ...]}              # newest first, at most 50

Outcomes are split (README, "Outcomes"): ``errors`` counts ``error`` and ``upstream_error``,
and ``error_rate`` is ``errors`` over every finished request; ``cancelled`` (an operator
cancelled it) and ``client_closed`` (the client went away) are counted on their own and never
move the error rate: neither says the upstream or the hub failed. Counts are over the window
(groups) or the step (series points).

Rates are over the time the service can speak for: the window, or less while the service is
younger than it and nothing says the fleet is older (``observed_since``: the earliest of this
service's start, the oldest entry read back from the stream, and the earliest ``started_at``
of the workers in view). Dividing the first 37 s of traffic by 60 s would show 1.6/s for 3/s.

Percentiles are nearest-rank and null when there is no sample; ``ttft_*`` (start to the first
generated output) come from the entries that carry ``ttft_ms``. A request without a model is
grouped under ``"unknown"``.

Model names are chosen by clients, so ``by_model`` (and ``by_worker``) keep at most
``MAX_GROUPS`` groups, the busiest (completed plus in flight); the rest are folded into
``"other"``, which keeps the frame small and its cost per tick bounded whatever clients send.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from vdm_hub.services.stream.supervise import stop_if_cancelled
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys

log = logging.getLogger("vdm.stream.stats")

WINDOW_S = 60.0
HISTORY_S = 600.0
RECENT = 50
REBUILD_MAX = 20_000  # entries read back on start
WINDOW_MAX = 200_000  # bound on the window deque whatever the rate
BUCKET_SAMPLES = 2048  # durations kept per series bucket (reservoir)
UNKNOWN_MODEL = schema.UNKNOWN_MODEL
MAX_GROUPS = 100  # groups per by_worker / by_model; the rest fold into OTHER
OTHER = "other"
# What the error rate counts: the upstream answered >= 400, or could not be reached or broke
# off. A cancel or a client that left is not a failure of the service (README, "Outcomes").
ERROR_OUTCOMES = frozenset({schema.Outcome.ERROR.value, schema.Outcome.UPSTREAM_ERROR.value})
CANCELLED = schema.Outcome.CANCELLED.value
CLIENT_CLOSED = schema.Outcome.CLIENT_CLOSED.value


class Done(NamedTuple):
    end: float
    worker: str
    model: str
    duration_ms: float
    outcome: str
    ttft_ms: float | None = None


@dataclass
class Outcomes:
    """How many finished requests ended in error, were cancelled, or lost their client."""

    errors: int = 0
    cancelled: int = 0
    client_closed: int = 0

    def count(self, outcome: str) -> None:
        if outcome in ERROR_OUTCOMES:
            self.errors += 1
        elif outcome == CANCELLED:
            self.cancelled += 1
        elif outcome == CLIENT_CLOSED:
            self.client_closed += 1

    def fields(self, finished: int) -> dict[str, Any]:
        return {
            "error_rate": round(self.errors / finished, 4) if finished else 0.0,
            "errors": self.errors,
            "cancelled": self.cancelled,
            "client_closed": self.client_closed,
        }


@dataclass
class Bucket:
    count: int = 0
    outcomes: Outcomes = field(default_factory=Outcomes)
    durations: list[float] = field(default_factory=list)
    in_flight: int | None = None
    ttft_count: int = 0
    ttfts: list[float] = field(default_factory=list)

    def add(self, duration_ms: float, outcome: str, ttft_ms: float | None = None) -> None:
        self.count += 1
        self.outcomes.count(outcome)
        _sample(self.durations, self.count, duration_ms)
        if ttft_ms is not None:
            self.ttft_count += 1
            _sample(self.ttfts, self.ttft_count, ttft_ms)


def _sample(samples: list[float], seen: int, value: float) -> None:
    """Reservoir sampling: percentiles stay honest at any rate with bounded memory."""
    if len(samples) < BUCKET_SAMPLES:
        samples.append(value)
    else:
        i = random.randrange(seen)
        if i < BUCKET_SAMPLES:
            samples[i] = value


def ttft_of(entry: Mapping[str, Any]) -> float | None:
    """``ttft_ms`` of an entry or row: None when absent (older workers) or not a sane number."""
    value = entry.get("ttft_ms")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return round(sorted_values[rank - 1], 3)


def _group(
    durations: list[float],
    outcomes: Outcomes,
    seconds: float,
    in_flight: int | None,
    ttfts: list[float] | None = None,
) -> dict[str, Any]:
    durations.sort()
    ttfts = sorted(ttfts or ())
    n = len(durations)
    return {
        "requests_per_s": round(n / seconds, 4),
        **outcomes.fields(n),
        "p50_ms": percentile(durations, 0.50),
        "p95_ms": percentile(durations, 0.95),
        "p99_ms": percentile(durations, 0.99),
        "ttft_p50_ms": percentile(ttfts, 0.50),
        "ttft_p95_ms": percentile(ttfts, 0.95),
        "completed": n,
        "in_flight": in_flight,
    }


@dataclass
class _Acc:
    durations: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    outcomes: Outcomes = field(default_factory=Outcomes)
    in_flight: int = 0

    def add(self, done: Done) -> None:
        self.durations.append(done.duration_ms)
        self.outcomes.count(done.outcome)
        if done.ttft_ms is not None:
            self.ttfts.append(done.ttft_ms)


def _capped(
    window: list[Done], attr: str, flight: dict[str, int], seconds: float
) -> dict[str, dict[str, Any]]:
    """Groups by ``attr`` of the window plus the in-flight counts, at most MAX_GROUPS + other.

    Counting first and grouping only the kept keys bounds the work as well as the frame.
    """
    weight: dict[str, int] = dict(flight)
    for done in window:
        key = getattr(done, attr)
        weight[key] = weight.get(key, 0) + 1
    if len(weight) > MAX_GROUPS:
        busiest = sorted(weight, key=lambda k: (-weight[k], k))[:MAX_GROUPS]
        kept = set(busiest)
    else:
        kept = set(weight)
    groups: dict[str, _Acc] = {}
    for done in window:
        key = getattr(done, attr)
        key = key if key in kept else OTHER
        acc = groups.get(key)
        if acc is None:
            acc = groups[key] = _Acc()
        acc.add(done)
    for key, n in flight.items():
        key = key if key in kept else OTHER
        acc = groups.get(key)
        if acc is None:
            acc = groups[key] = _Acc()
        acc.in_flight += n
    return {
        k: _group(a.durations, a.outcomes, seconds, a.in_flight, a.ttfts)
        for k, a in sorted(groups.items())
    }


def flight_summary(counts: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    """``{"fleet", "by_worker", "by_model"}`` of the hub's per-worker, per-model counts."""
    by_worker: dict[str, int] = {}
    by_model: dict[str, int] = {}
    for wid, models in counts.items():
        by_worker[wid] = sum(models.values())
        for model, n in models.items():
            by_model[model] = by_model.get(model, 0) + n
    return {"fleet": sum(by_worker.values()), "by_worker": by_worker, "by_model": by_model}


class RollingStats:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        step: float = 2.0,
        window_s: float = WINDOW_S,
        in_flight: Callable[[], dict[str, Any]] | None = None,
        fleet_since: Callable[[], float | None] | None = None,
        on_entry: Callable[[schema.CompletedEntry], None] | None = None,
        on_malformed: Callable[[object], None] | None = None,
        started: float | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.step = max(step, 0.05)
        self.window_s = window_s
        # () -> {"fleet": n, "by_worker": {wid: n}, "by_model": {model: n}}
        self._in_flight = in_flight or (lambda: flight_summary({}))
        # () -> the earliest `started_at` of the workers in view (None: none known).
        self._fleet_since = fleet_since or (lambda: None)
        # Since when this service can speak for the fleet's finished requests: its own start,
        # moved back by the oldest entry the rebuild reads (see observed_since).
        self.since = time.time() if started is None else started
        self._on_entry = on_entry or (lambda e: None)
        self._on_malformed = on_malformed or (lambda d: None)
        self.window: deque[Done] = deque(maxlen=WINDOW_MAX)
        self.buckets: dict[int, Bucket] = {}
        self.recent: deque[schema.CompletedEntry] = deque(maxlen=RECENT)
        self.last_id: str = "0-0"
        self.rebuilt = False

    # ----------------------------------------------------------------- ingest

    def add(self, entry: schema.CompletedEntry, now: float) -> None:
        end = min(now, entry["start_time"] + entry["duration_ms"] / 1000.0)
        model = entry["model"] or UNKNOWN_MODEL
        outcome = entry["outcome"]
        ttft = ttft_of(entry)
        if end >= now - self.window_s:
            self.window.append(
                Done(end, entry["worker_id"], model, entry["duration_ms"], outcome, ttft)
            )
        if end >= now - HISTORY_S:
            index = int(end // self.step)
            bucket = self.buckets.get(index)
            if bucket is None:
                bucket = self.buckets[index] = Bucket()
            bucket.add(entry["duration_ms"], outcome, ttft)
        self.recent.appendleft(entry)

    def _decode(self, entry_id: Any, fields: dict[Any, Any]) -> schema.CompletedEntry | None:
        try:
            return schema.decode_completed(entry_id, fields)
        except schema.MalformedMessage as exc:
            self._on_malformed(exc)
            return None

    async def rebuild(self) -> None:
        """Load the recent past newest-first, then add it oldest-first."""
        raw: Any = await self.redis.xrevrange(self.keys.completed, count=REBUILD_MAX)
        now = time.time()
        entries = []
        for entry_id, fields in raw:
            entry = self._decode(entry_id, fields)
            if entry is not None:
                entries.append(entry)
        if raw:
            first = raw[0][0]
            self.last_id = first.decode() if isinstance(first, bytes) else str(first)
        for entry in reversed(entries):
            self.add(entry, now)
            self.since = min(self.since, entry["start_time"] + entry["duration_ms"] / 1000.0)
        self.rebuilt = True

    async def run(self) -> None:
        backoff = 0.05
        while True:
            stop_if_cancelled()
            try:
                if not self.rebuilt:
                    await self.rebuild()
                while True:
                    reply: Any = await self.redis.xread(
                        {self.keys.completed: self.last_id}, block=1000, count=1000
                    )
                    backoff = 0.05
                    now = time.time()
                    for _stream, items in reply or ():
                        for entry_id, fields in items:
                            self.last_id = (
                                entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                            )
                            entry = self._decode(entry_id, fields)
                            if entry is not None:
                                self.add(entry, now)
                                self._on_entry(entry)
            except (RedisError, OSError) as exc:
                log.warning("completed stream: lost Redis (%s); retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)

    # ----------------------------------------------------------------- summary

    def tick(self, now: float | None = None) -> dict[str, Any]:
        """Expire old data, stamp the current bucket's in-flight count, return the summary."""
        now = time.time() if now is None else now
        window = self.window
        horizon = now - self.window_s
        while window and window[0].end < horizon:
            window.popleft()
        oldest = int((now - HISTORY_S) // self.step)
        for index in [i for i in self.buckets if i < oldest]:
            del self.buckets[index]
        flight = self._in_flight()
        current = int(now // self.step)
        bucket = self.buckets.get(current)
        if bucket is None:
            bucket = self.buckets[current] = Bucket()
        bucket.in_flight = flight["fleet"]
        return self.summary(now, flight)

    def observed_since(self) -> float:
        """Since when the rates can speak for the fleet: this service's start, or earlier when
        the stream held older entries or a worker in view started earlier (it was serving)."""
        fleet = self._fleet_since()
        return self.since if fleet is None else min(self.since, fleet)

    def window_seconds(self, now: float) -> float:
        """The window the rates are over: the full window, or the time observed so far (at
        least one step, so the first finished request is not divided by a few milliseconds)."""
        observed = now - self.observed_since()
        return min(self.window_s, max(self.step, observed))

    def summary(self, now: float, flight: dict[str, Any] | None = None) -> dict[str, Any]:
        flight = flight or self._in_flight()
        horizon = now - self.window_s
        window = [done for done in self.window if done.end >= horizon]
        fleet = _Acc()
        for done in window:
            fleet.add(done)
        seconds = self.window_seconds(now)
        current = int(now // self.step)
        series = []
        for index in sorted(self.buckets):
            if index >= current:
                continue  # the current bucket is still filling
            b = self.buckets[index]
            point = _group(list(b.durations), b.outcomes, self.step, b.in_flight, list(b.ttfts))
            # The durations are a sample of at most BUCKET_SAMPLES: counts come from b.count.
            point["requests_per_s"] = round(b.count / self.step, 4)
            point.update(b.outcomes.fields(b.count))
            del point["completed"]
            series.append({"t": round((index + 1) * self.step, 3), **point})
        return {
            "timestamp": round(now, 3),
            "window_s": round(seconds, 3),
            "step_s": self.step,
            "fleet": _group(fleet.durations, fleet.outcomes, seconds, flight["fleet"], fleet.ttfts),
            "by_worker": _capped(window, "worker", flight["by_worker"], seconds),
            "by_model": _capped(window, "model", flight["by_model"], seconds),
            "series": series,
            "recent": list(self.recent),
        }
