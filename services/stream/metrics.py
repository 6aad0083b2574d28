"""Prometheus metrics of one stream service (the names are public: dashboards and alerts use them).

Gauges derived from the hub's state are computed at scrape time by a collector, so the hot
paths (batch apply, fan-out) pay nothing for them. Only the completed-requests counter and
the histograms are updated as entries arrive (once per finished request).

- ``vdm_time_to_first_byte_seconds{worker,model}``: start to the first response body byte
  (the entry's ``ttfb_ms``); ``vdm_time_to_first_token_seconds{worker,model}``: start to the
  first generated output (``ttft_ms``: the first SSE event that carries output, or the first
  body byte of any other response). An entry without the field (an older worker's, or a
  request that never got that far) is not observed.

- ``vdm_hub_lag_seconds``: how far behind the hub is, measured as now minus the ``start_time``
  of the newest ``start`` event applied (it includes the worker's batching delay).
- ``vdm_worker_events_dropped_total{worker}``: notices the worker itself could not publish
  (its own ``events_dropped`` count, as of the worker record it last wrote: a worker rewrites
  its record whenever it re-registers, which is what follows dropped events).
- ``vdm_completed_dropped_total{worker}``: finished requests a worker dropped because they
  outgrew its backlog bound during a Redis outage (its ``completed_dropped``, carried the same
  way: the re-registration that ends the outage writes it).
- ``vdm_batches_missed_total{worker}``: batches a worker published that this hub never saw
  (sequence gaps; each gap was healed by a resync of that worker).
- ``vdm_oldest_request_age_seconds{worker}`` and ``vdm_requests_stuck{worker}`` (requests in
  flight for longer than ``VDM_STUCK_AFTER``): judged on this host's clock at scrape time.
- ``vdm_requests_stalled{worker}``: streams that got their first token and have sent nothing
  for longer than ``VDM_STALL_AFTER`` (the row's ``last_output_at``, see :func:`is_stalled`).

Series of a worker that left the view are dropped ``PRUNE_AFTER`` seconds after its last
sign of life (gauges at once: they describe the present), so a fleet whose worker ids change on
every restart does not grow the exposition forever.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from vdm_hub.shared import schema

if TYPE_CHECKING:
    from vdm_hub.services.stream.fanout import Broadcaster
    from vdm_hub.services.stream.hub import Hub

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
# For the time to first byte and to first token alike (an LLM's first token takes from tens of
# milliseconds to tens of seconds with reasoning).
FIRST_RESPONSE_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
PRUNE_AFTER = 600.0  # seconds a departed worker's counters stay exported
# Label values come from untrusted input; cap how many distinct series a bad actor can create.
MAX_LABEL_SETS = 5000
OTHER = "other"


def _capped_in_flight(counts: Mapping[str, Mapping[str, int]]) -> dict[tuple[str, str], int]:
    """The hub's in-flight counts by (worker, model), past MAX_LABEL_SETS folded into other.

    Models are client-chosen: the series are capped like the counters' labels.
    """
    capped: dict[tuple[str, str], int] = {}
    for wid, models in counts.items():
        for model, n in models.items():
            key = (wid, model)
            if len(capped) >= MAX_LABEL_SETS and key not in capped:
                key = (OTHER, OTHER)
            capped[key] = capped.get(key, 0) + n
    return capped


def is_stalled(row: Mapping[str, object], silent_since: float) -> bool:
    """A stream (asked for, or answered as SSE) that got its first token and whose last output
    is older than ``silent_since``: silent for longer than ``VDM_STALL_AFTER``. A row without
    ``last_output_at`` (a worker older than the field) is never called stalled. The browser
    decides the same way (assets/01_vdm_viewcore.js ``stalled``)."""
    if row.get("ttft_ms") is None:
        return False
    if row.get("is_streaming") is not True and row.get("chunks_out") is None:
        return False
    last = row.get("last_output_at")
    return isinstance(last, int | float) and not isinstance(last, bool) and last < silent_since


class HubCollector(Collector):
    """The gauges of the hub's present state, computed at scrape time."""

    def __init__(
        self,
        hub: Hub | None,
        bc: Broadcaster,
        requests: RequestMetrics,
        stuck_after: float,
        stall_after: float = 30.0,
    ) -> None:
        self.hub = hub
        self.bc = bc
        self.requests = requests
        self.stuck_after = stuck_after
        self.stall_after = stall_after

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        in_flight = GaugeMetricFamily(
            "vdm_requests_in_flight", "Requests in flight", labels=["worker", "model"]
        )
        workers = GaugeMetricFamily("vdm_workers", "Known workers by status", labels=["status"])
        missed = CounterMetricFamily(
            "vdm_batches_missed",
            "Batches a worker published that this hub missed (sequence gaps, healed by resync)",
            labels=["worker"],
        )
        lag = GaugeMetricFamily("vdm_hub_lag_seconds", "Now minus the newest applied start")
        malformed = CounterMetricFamily(
            "vdm_messages_malformed", "Malformed messages and hash entries skipped"
        )
        clients = GaugeMetricFamily("vdm_sse_clients", "Open SSE streams")
        clients.add_metric([], self.bc.clients)
        hub = self.hub
        bad = self.requests.completed_malformed[0]
        if hub is not None:
            by_status = {"up": 0, "stale": 0}
            for view in hub.workers.values():
                by_status[view.status] = by_status.get(view.status, 0) + 1
            for (wid, model), n in _capped_in_flight(hub.in_flight()).items():
                in_flight.add_metric([wid, model], n)
            for status, n in by_status.items():
                workers.add_metric([status], n)
            gaps = hub.counters.dropped_by_worker
            for wid in [w for w in gaps if w not in hub.workers]:
                del gaps[wid]  # a departed worker's gaps: its next epoch starts from zero
            for wid, n in gaps.items():
                missed.add_metric([wid], n)
            lag.add_metric([], hub.counters.last_lag_s)
            bad += hub.counters.malformed
        malformed.add_metric([], bad)
        yield in_flight
        yield workers
        yield clients
        yield lag
        yield malformed
        yield missed
        yield from self._per_worker(hub)

    def _per_worker(self, hub: Hub | None) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """What each worker in view reports (its record's counts) and how its requests fare."""
        dropped = CounterMetricFamily(
            "vdm_worker_events_dropped",
            "Notices a worker could not publish (its own count, from its worker record)",
            labels=["worker"],
        )
        completed_dropped = CounterMetricFamily(
            "vdm_completed_dropped",
            "Finished requests a worker dropped past its backlog bound (from its worker record)",
            labels=["worker"],
        )
        oldest = GaugeMetricFamily(
            "vdm_oldest_request_age_seconds",
            "Age of the oldest request in flight (0 when none)",
            labels=["worker"],
        )
        stuck = GaugeMetricFamily(
            "vdm_requests_stuck",
            "Requests in flight for longer than VDM_STUCK_AFTER",
            labels=["worker"],
        )
        stalled = GaugeMetricFamily(
            "vdm_requests_stalled",
            "Streams silent for longer than VDM_STALL_AFTER after their first token",
            labels=["worker"],
        )
        now = time.time()
        stuck_before = now - self.stuck_after
        silent_since = now - self.stall_after
        for wid, view in hub.workers.items() if hub is not None else ():
            first = now
            n_stuck = n_stalled = 0
            for row in view.rows.values():
                start = row["start_time"]
                first = min(first, start)
                n_stuck += start < stuck_before
                n_stalled += is_stalled(row, silent_since)
            oldest.add_metric([wid], max(0.0, now - first))
            stuck.add_metric([wid], n_stuck)
            stalled.add_metric([wid], n_stalled)
            record: Mapping[str, Any] = view.record or {}
            dropped.add_metric([wid], int(record.get("events_dropped", 0)))
            completed_dropped.add_metric([wid], int(record.get("completed_dropped", 0)))
        yield dropped
        yield completed_dropped
        yield oldest
        yield stuck
        yield stalled


class _Pruner(Collector):
    """Registered first, so a scrape prunes departed workers before any series is read."""

    def __init__(self, hub: Hub, requests: RequestMetrics) -> None:
        self.hub = hub
        self.requests = requests

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self.requests.prune(set(self.hub.workers))
        yield from ()


class StreamMetrics:
    """The registry of one app (not the global one, so several apps can live in one test):
    the finished-request series of ``requests`` and the gauges of the hub's state."""

    def __init__(
        self,
        hub: Hub | None,
        bc: Broadcaster,
        requests: RequestMetrics,
        *,
        stuck_after: float = 300.0,
        stall_after: float = 30.0,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        if hub is not None:
            self.registry.register(_Pruner(hub, requests))
        self.registry.register(requests)
        self.registry.register(HubCollector(hub, bc, requests, stuck_after, stall_after))


class _Finished:
    """The finished requests of one (worker, model) label set, as plain numbers."""

    __slots__ = ("duration_sum", "durations", "outcomes", "ttfb_sum", "ttfbs", "ttft_sum", "ttfts")

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}
        # Histogram bucket counts (not cumulative; the last one is +Inf) and sums, seconds.
        self.durations = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.ttfbs = [0] * (len(FIRST_RESPONSE_BUCKETS) + 1)
        self.ttfb_sum = 0.0
        self.ttfts = [0] * (len(FIRST_RESPONSE_BUCKETS) + 1)
        self.ttft_sum = 0.0


def _le(bounds: tuple[float, ...]) -> tuple[str, ...]:
    """Bucket bounds as the exposition spells them ("0.05", "1.0", "+Inf")."""
    return tuple(floatToGoString(b) for b in (*bounds, math.inf))  # type: ignore[no-untyped-call]


DURATION_LE = _le(DURATION_BUCKETS)
FIRST_RESPONSE_LE = _le(FIRST_RESPONSE_BUCKETS)


def _cumulative(le: tuple[str, ...], counts: list[int]) -> list[tuple[str, float]]:
    out = []
    total = 0
    for bound, n in zip(le, counts, strict=True):
        total += n
        out.append((bound, float(total)))
    return out


class RequestMetrics(Collector):
    """Counter and histograms of finished requests, fed by the completed-stream reader.

    ``observe`` runs once per finished request of the whole fleet, so it only adds to plain
    numbers (a histogram bucket is one ``bisect``); the Prometheus families are built from them
    at scrape time, like the hub's gauges (``prometheus_client``'s custom-collector way, in
    place of its ``Counter``/``Histogram`` objects, whose every update takes a lock and walks
    the buckets in Python).
    """

    def __init__(self) -> None:
        # Malformed completed-stream entries (the hub counts its own).
        self.completed_malformed = [0]
        self._series: dict[tuple[str, str], _Finished] = {}
        self._cancelled: dict[str, int] = {}
        self._last_seen: dict[str, float] = {}  # worker label -> monotonic time of life

    def observe(self, done: schema.Finished) -> None:
        worker, model = done.worker_id, done.model or schema.UNKNOWN_MODEL
        series = self._series.get((worker, model))
        if series is None:
            if len(self._series) >= MAX_LABEL_SETS:
                worker, model = OTHER, OTHER
            series = self._series.get((worker, model))
            if series is None:
                series = self._series[(worker, model)] = _Finished()
        self._last_seen[worker] = time.monotonic()
        outcome = done.outcome
        outcomes = series.outcomes
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        seconds = done.duration_ms / 1000.0
        series.durations[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        series.duration_sum += seconds
        # Entries of workers older than these timings carry none (nor do requests that never
        # got a response byte or an output): not observed.
        if done.ttfb_ms is not None:
            seconds = done.ttfb_ms / 1000.0
            series.ttfbs[bisect.bisect_left(FIRST_RESPONSE_BUCKETS, seconds)] += 1
            series.ttfb_sum += seconds
        if done.ttft_ms is not None:
            seconds = done.ttft_ms / 1000.0
            series.ttfts[bisect.bisect_left(FIRST_RESPONSE_BUCKETS, seconds)] += 1
            series.ttft_sum += seconds
        if outcome == "cancelled":
            self._cancelled[worker] = self._cancelled.get(worker, 0) + 1

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        labels = ["worker", "model"]
        requests = CounterMetricFamily(
            "vdm_requests", "Finished requests", labels=[*labels, "outcome"]
        )
        duration = HistogramMetricFamily(
            "vdm_request_duration_seconds", "Duration of finished requests", labels=labels
        )
        ttfb = HistogramMetricFamily(
            "vdm_time_to_first_byte_seconds",
            "Start of a finished request to the first response body byte",
            labels=labels,
        )
        ttft = HistogramMetricFamily(
            "vdm_time_to_first_token_seconds",
            "Start of a finished request to its first generated output (first SSE event that"
            " carries output; first body byte of any other response)",
            labels=labels,
        )
        cancelled = CounterMetricFamily(
            "vdm_requests_cancelled",
            "Requests cancelled by an operator (outcome cancelled)",
            labels=["worker"],
        )
        for (worker, model), series in sorted(self._series.items()):
            for outcome, n in sorted(series.outcomes.items()):
                requests.add_metric([worker, model, outcome], n)
            duration.add_metric(
                [worker, model],
                _cumulative(DURATION_LE, series.durations),
                series.duration_sum,
            )
            ttfb.add_metric(
                [worker, model], _cumulative(FIRST_RESPONSE_LE, series.ttfbs), series.ttfb_sum
            )
            ttft.add_metric(
                [worker, model], _cumulative(FIRST_RESPONSE_LE, series.ttfts), series.ttft_sum
            )
        for worker, n in sorted(self._cancelled.items()):
            cancelled.add_metric([worker], n)
        yield requests
        yield duration
        yield ttfb
        yield ttft
        yield cancelled

    def prune(self, present: set[str], now: float | None = None) -> None:
        """Forget the series of workers absent from the view for ``PRUNE_AFTER`` seconds."""
        now = time.monotonic() if now is None else now
        for wid in present:
            self._last_seen[wid] = now
        gone = {w for w, t in self._last_seen.items() if now - t > PRUNE_AFTER}
        if not gone:
            return
        for wid in gone:
            del self._last_seen[wid]
            self._cancelled.pop(wid, None)
        for key in [k for k in self._series if k[0] in gone]:
            del self._series[key]

    def malformed_completed(self, _detail: object) -> None:
        self.completed_malformed[0] += 1
