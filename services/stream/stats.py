"""Rolling statistics of finished requests, read from the capped ``P:completed`` stream.

On start the recent past is rebuilt with XREVRANGE (so charts survive a restart of the stream
service), then an XREAD BLOCK loop follows the stream from the newest id seen. Time is cut
into steps of ``VDM_ACTIVE_REQUESTS_SSE_INTERVAL``; ingest adds each finished request to three
aggregates of its step (the fleet's, its worker's, its model's: counts and a reservoir of
durations), O(1). Statistics are computed once per tick from those aggregates, so a tick costs
O(steps x groups), not O(requests): the window (the steps of the last ``WINDOW_S``, whole
steps) of a fleet finishing 100,000 requests a minute costs what a quiet one does.

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

The window is whole steps, the last of them still filling: those that start at or after
``now`` minus ``WINDOW_S``. Rates are over the time the service can speak for: that window,
or less while the service is younger than it and nothing says the fleet is older
(``observed_since``: the earliest of this service's start, the oldest entry read back from the
stream, and the earliest ``started_at`` of the workers in view). Dividing the first 37 s of
traffic by 60 s would show 1.6/s for 3/s.

Percentiles are nearest-rank and null when there is no sample; ``ttft_*`` (start to the first
generated output) come from the entries that carry ``ttft_ms``. They are exact while no group
of a step has more requests than its reservoir holds (``STEP_SAMPLES`` for the fleet,
``GROUP_SAMPLES`` per worker or model), else computed on a sample in which every step weighs by
its requests (:func:`merged`). A request without a model is grouped under ``"unknown"``.

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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from vdm_hub.services.stream.supervise import stop_if_cancelled
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.redis_client import unparsed_twin

log = logging.getLogger("vdm.stream.stats")

WINDOW_S = 60.0
HISTORY_S = 600.0
RECENT = 50
REBUILD_MAX = 20_000  # entries read back on start
STEP_SAMPLES = 2048  # durations kept per step for the whole fleet (reservoir): the series
GROUP_SAMPLES = 256  # per worker or model per step
MERGED_SAMPLES = 4096  # at most this many sorted per percentile of the window
# Worker and model groups held over the window; past it, new ones count under OTHER (names are
# chosen by clients: this bounds memory whatever they send).
MAX_WINDOW_GROUPS = 200_000
UNKNOWN_MODEL = schema.UNKNOWN_MODEL
# The outcomes counted apart, by their place in Agg.outcomes. `errors` is what the error rate
# counts: the upstream answered >= 400, or could not be reached or broke off. A cancel or a
# client that left is not a failure of the service (README, "Outcomes").
ERRORS, CANCELLED, CLIENT_CLOSED = 0, 1, 2
OUTCOME_COUNTED: dict[str, int] = {
    schema.Outcome.ERROR.value: ERRORS,
    schema.Outcome.UPSTREAM_ERROR.value: ERRORS,
    schema.Outcome.CANCELLED.value: CANCELLED,
    schema.Outcome.CLIENT_CLOSED.value: CLIENT_CLOSED,
}
MAX_GROUPS = 100  # groups per by_worker / by_model; the rest fold into OTHER
OTHER = "other"


class Agg:
    """Finished requests of one group (the fleet, a worker or a model) within one step."""

    __slots__ = ("cap", "count", "durations", "outcomes", "ttft_count", "ttfts")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.count = 0
        self.outcomes = [0, 0, 0]  # errors, cancelled, client_closed
        self.durations: list[float] = []
        self.ttft_count = 0
        self.ttfts: list[float] = []

    def add(self, duration_ms: float, counted: int | None, ttft_ms: float | None) -> None:
        # Reservoir sampling, inlined (this runs three times per finished request): every
        # value seen so far has the same chance to be among the kept ones.
        self.count = n = self.count + 1
        if counted is not None:
            self.outcomes[counted] += 1
        if n <= self.cap:
            self.durations.append(duration_ms)
        else:
            i = int(_random() * n)
            if i < self.cap:
                self.durations[i] = duration_ms
        if ttft_ms is not None:
            self.ttft_count = n = self.ttft_count + 1
            if n <= self.cap:
                self.ttfts.append(ttft_ms)
            else:
                i = int(_random() * n)
                if i < self.cap:
                    self.ttfts[i] = ttft_ms


class Step:
    """One step of time: the fleet's finished requests (a point of the series) and, while the
    step is inside the window, the same per worker and per model."""

    __slots__ = ("fleet", "in_flight", "models", "point", "workers")

    def __init__(self) -> None:
        self.fleet = Agg(STEP_SAMPLES)
        self.workers: dict[str, Agg] = {}
        self.models: dict[str, Agg] = {}
        self.in_flight: int | None = None
        self.point: dict[str, Any] | None = None  # its series point, once the step is over


_random = random.random


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return round(sorted_values[rank - 1], 3)


def merged(parts: list[tuple[list[float], int]]) -> list[float]:
    """The sorted union of reservoirs, each ``(samples, how many they stand for)``.

    While no reservoir overflowed this is every value (exact percentiles). Otherwise each part
    is thinned to one common sampling rate, so a step with more requests weighs more, and the
    union to at most ``MERGED_SAMPLES`` (evenly spaced picks: a reservoir is in no particular
    order of value).
    """
    total = sum(n for _, n in parts)
    held = sum(len(s) for s, _ in parts)
    if held == total and held <= MERGED_SAMPLES:
        out = [v for s, _ in parts for v in s]
    else:
        rate = min([len(s) / n for s, n in parts if n] + [MERGED_SAMPLES / max(1, total)])
        out = []
        for s, n in parts:
            k = min(len(s), round(n * rate))
            out += s if k == len(s) else [s[i * len(s) // k] for i in range(k)]
    out.sort()
    return out


def _point(aggs: list[Agg], seconds: float, in_flight: int | None) -> dict[str, Any]:
    """The summary of some finished requests (a group's keys) from their step aggregates."""
    n = sum(a.count for a in aggs)
    errors = sum(a.outcomes[ERRORS] for a in aggs)
    durations = merged([(a.durations, a.count) for a in aggs])
    ttfts = merged([(a.ttfts, a.ttft_count) for a in aggs])
    return {
        "requests_per_s": round(n / seconds, 4),
        "error_rate": round(errors / n, 4) if n else 0.0,
        "errors": errors,
        "cancelled": sum(a.outcomes[CANCELLED] for a in aggs),
        "client_closed": sum(a.outcomes[CLIENT_CLOSED] for a in aggs),
        "p50_ms": percentile(durations, 0.50),
        "p95_ms": percentile(durations, 0.95),
        "p99_ms": percentile(durations, 0.99),
        "ttft_p50_ms": percentile(ttfts, 0.50),
        "ttft_p95_ms": percentile(ttfts, 0.95),
        "completed": n,
        "in_flight": in_flight,
    }


def _capped(
    window: list[Step], attr: str, flight: dict[str, int], seconds: float
) -> dict[str, dict[str, Any]]:
    """Groups by ``attr`` (workers or models) of the window plus the in-flight counts, at most
    MAX_GROUPS + other: the busiest (completed plus in flight) are kept.

    The work is per group and step, never per request.
    """
    parts: dict[str, list[Agg]] = {}
    for step in window:
        for key, agg in getattr(step, attr).items():
            found = parts.get(key)
            if found is None:
                parts[key] = [agg]
            else:
                found.append(agg)
    weight = {key: sum(a.count for a in aggs) for key, aggs in parts.items()}
    for key, n in flight.items():
        weight[key] = weight.get(key, 0) + n
    if len(weight) > MAX_GROUPS:
        kept = set(sorted(weight, key=lambda k: (-weight[k], k))[:MAX_GROUPS])
    else:
        kept = set(weight)
    groups: dict[str, list[Agg]] = {}
    in_flight: dict[str, int] = {}
    for key in weight:
        name = key if key in kept else OTHER
        groups.setdefault(name, []).extend(parts.get(key, ()))
        in_flight[name] = in_flight.get(name, 0) + flight.get(key, 0)
    return {key: _point(groups[key], seconds, in_flight[key]) for key in sorted(groups)}


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
        on_entry: Callable[[schema.Finished], None] | None = None,
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
        # Reads each entry as Redis sent it: a list of names and values, not a dict per entry
        # (shared/schema.py takes them by position).
        self._reader = unparsed_twin(redis, "XREAD", "XREVRANGE") or redis
        self.steps: dict[int, Step] = {}
        # The newest valid entries as read, (id, fields), newest first.
        self.recent: deque[tuple[Any, Any]] = deque(maxlen=RECENT)
        self.last_id: str = "0-0"
        self.rebuilt = False
        self._groups = 0  # worker and model aggregates held (MAX_WINDOW_GROUPS)

    # ----------------------------------------------------------------- ingest

    def ingest(
        self, items: Iterable[tuple[Any, Any]], now: float, *, rebuilding: bool = False
    ) -> None:
        """Stream entries ``(id, fields)``, oldest first: each valid one into the aggregates
        and, as it came, into ``recent`` (decoded whole only when a summary shows it); a new
        one (not ``rebuilding``) to ``on_entry``, an old one moves ``since`` back to its end.
        A malformed one is skipped and counted."""
        recent = self.recent
        for item in items:
            try:
                done = schema.finished_of(item[1])
            except schema.MalformedMessage as exc:
                self._on_malformed(exc)
                continue
            self.add(done, now)
            if rebuilding:
                self.since = min(self.since, done.start_time + done.duration_ms / 1000.0)
            else:
                self._on_entry(done)
            recent.appendleft(item)

    def add(self, done: schema.Finished, now: float) -> None:
        """One finished request: O(1), three aggregates (fleet, worker, model) of its step."""
        duration = done.duration_ms
        end = done.start_time + duration / 1000.0
        if end > now:
            end = now
        elif end < now - HISTORY_S:
            return
        index = int(end // self.step)
        step = self.steps.get(index)
        if step is None:
            step = self.steps[index] = Step()
        step.point = None  # a late entry changes a step that is over
        counted = OUTCOME_COUNTED.get(done.outcome)
        ttft = done.ttft_ms
        step.fleet.add(duration, counted, ttft)
        if index < self._first_step(now):
            return  # before the window's first step: in the series only
        groups = step.workers
        key = done.worker_id
        (groups.get(key) or self._new_group(groups, key)).add(duration, counted, ttft)
        groups = step.models
        key = done.model or UNKNOWN_MODEL
        (groups.get(key) or self._new_group(groups, key)).add(duration, counted, ttft)

    def _first_step(self, now: float) -> int:
        """The window's first step: the oldest that starts at or after ``now - window_s``."""
        return math.ceil((now - self.window_s) / self.step)

    def _new_group(self, groups: dict[str, Agg], key: str) -> Agg:
        if self._groups >= MAX_WINDOW_GROUPS:
            key = OTHER  # client-chosen names cannot grow memory past the bound
            agg = groups.get(key)
            if agg is not None:
                return agg
        agg = groups[key] = Agg(GROUP_SAMPLES)
        self._groups += 1
        return agg

    async def rebuild(self) -> None:
        """Load the recent past (newest first from Redis), add it oldest first."""
        raw: Any = await self._reader.xrevrange(self.keys.completed, count=REBUILD_MAX)
        if raw:
            first = raw[0][0]
            self.last_id = first.decode() if isinstance(first, bytes) else str(first)
        self.ingest(reversed(raw), time.time(), rebuilding=True)
        self.rebuilt = True

    async def run(self) -> None:
        backoff = 0.05
        while True:
            stop_if_cancelled()
            try:
                if not self.rebuilt:
                    await self.rebuild()
                while True:
                    reply: Any = await self._reader.xread(
                        {self.keys.completed: self.last_id}, block=1000, count=1000
                    )
                    backoff = 0.05
                    now = time.time()
                    # Redis's reply as it comes: [[stream, items]], {stream: items} (RESP3)
                    # or, from a cluster client, redis-py's [[stream, items]].
                    streams = reply.items() if isinstance(reply, dict) else reply or ()
                    for _stream, items in streams:
                        self.ingest(items, now)
                        if items:
                            last = items[-1][0]
                            self.last_id = last.decode() if isinstance(last, bytes) else str(last)
            except (RedisError, OSError) as exc:
                log.warning("completed stream: lost Redis (%s); retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)

    # ----------------------------------------------------------------- summary

    def tick(self, now: float | None = None) -> dict[str, Any]:
        """Expire old steps, stamp the current step's in-flight count, return the summary."""
        now = time.time() if now is None else now
        oldest = int((now - HISTORY_S) // self.step)
        for index in [i for i in self.steps if i < oldest]:
            self._forget_groups(self.steps.pop(index))
        # Steps that left the window keep their series point only.
        first = self._first_step(now)
        for index, past in self.steps.items():
            if index < first and (past.workers or past.models):
                self._forget_groups(past)
        flight = self._in_flight()
        current = int(now // self.step)
        step = self.steps.get(current)
        if step is None:
            step = self.steps[current] = Step()
        step.in_flight = flight["fleet"]
        return self.summary(now, flight)

    def _forget_groups(self, step: Step) -> None:
        self._groups -= len(step.workers) + len(step.models)
        step.workers, step.models = {}, {}

    def observed_since(self) -> float:
        """Since when the rates can speak for the fleet: this service's start, or earlier when
        the stream held older entries or a worker in view started earlier (it was serving)."""
        fleet = self._fleet_since()
        return self.since if fleet is None else min(self.since, fleet)

    def window_seconds(self, now: float) -> float:
        """The time the rates are over: the window's whole steps until now, or the time
        observed so far (at least one step, so the first finished request is not divided by a
        few milliseconds)."""
        covered = now - self._first_step(now) * self.step
        return min(covered, max(self.step, now - self.observed_since()))

    def summary(self, now: float, flight: dict[str, Any] | None = None) -> dict[str, Any]:
        """The payload of the module docstring: O(steps x groups), whatever the request rate."""
        flight = flight or self._in_flight()
        first = self._first_step(now)
        current = int(now // self.step)
        window = [step for index, step in self.steps.items() if index >= first]
        seconds = self.window_seconds(now)
        series = []
        for index in sorted(self.steps):
            if index >= current:
                continue  # the current step is still filling
            step = self.steps[index]
            if step.point is None:  # over: its point never changes again
                point = _point([step.fleet], self.step, step.in_flight)
                del point["completed"]
                step.point = {"t": round((index + 1) * self.step, 3), **point}
            series.append(step.point)
        return {
            "timestamp": round(now, 3),
            "window_s": round(seconds, 3),
            "step_s": self.step,
            "fleet": _point([s.fleet for s in window], seconds, flight["fleet"]),
            "by_worker": _capped(window, "workers", flight["by_worker"], seconds),
            "by_model": _capped(window, "models", flight["by_model"], seconds),
            "series": series,
            "recent": [schema.decode_completed(i, fields) for i, fields in self.recent],
        }
