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

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from vdm_hub.services.stream.stats import ttft_of
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
        missed = CounterMetricFamily(
            "vdm_batches_missed",
            "Batches a worker published that this hub missed (sequence gaps, healed by resync)",
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
        lag = GaugeMetricFamily("vdm_hub_lag_seconds", "Now minus the newest applied start")
        malformed = CounterMetricFamily(
            "vdm_messages_malformed", "Malformed messages and hash entries skipped"
        )
        clients = GaugeMetricFamily("vdm_sse_clients", "Open SSE streams")
        clients.add_metric([], self.bc.clients)
        hub = self.hub
        bad = self.requests.completed_malformed[0]
        if hub is not None:
            by_status = self._add_worker_series(
                hub, oldest, stuck, stalled, dropped, completed_dropped
            )
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
        yield dropped
        yield completed_dropped
        yield missed
        yield oldest
        yield stuck
        yield stalled

    def _add_worker_series(
        self,
        hub: Hub,
        oldest: GaugeMetricFamily,
        stuck: GaugeMetricFamily,
        stalled: GaugeMetricFamily,
        dropped: CounterMetricFamily,
        completed_dropped: CounterMetricFamily,
    ) -> dict[str, int]:
        """One series per worker in each family; returns how many workers have each status."""
        now = time.time()
        stuck_before = now - self.stuck_after
        silent_since = now - self.stall_after
        by_status = {"up": 0, "stale": 0}
        for wid, view in hub.workers.items():
            by_status[view.status] = by_status.get(view.status, 0) + 1
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
        return by_status


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
        for series in requests.series():
            self.registry.register(series)
        self.registry.register(HubCollector(hub, bc, requests, stuck_after, stall_after))


class RequestMetrics:
    """Counter and histograms of finished requests, fed by the completed-stream reader."""

    def __init__(self) -> None:
        self.requests = Counter(
            "vdm_requests",
            "Finished requests",
            ["worker", "model", "outcome"],
            registry=None,
        )
        self.duration = Histogram(
            "vdm_request_duration_seconds",
            "Duration of finished requests",
            ["worker", "model"],
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.ttfb = Histogram(
            "vdm_time_to_first_byte_seconds",
            "Start of a finished request to the first response body byte",
            ["worker", "model"],
            buckets=FIRST_RESPONSE_BUCKETS,
            registry=None,
        )
        self.ttft = Histogram(
            "vdm_time_to_first_token_seconds",
            "Start of a finished request to its first generated output (first SSE event that"
            " carries output; first body byte of any other response)",
            ["worker", "model"],
            buckets=FIRST_RESPONSE_BUCKETS,
            registry=None,
        )
        self.cancelled = Counter(
            "vdm_requests_cancelled",
            "Requests cancelled by an operator (outcome cancelled)",
            ["worker"],
            registry=None,
        )
        # Malformed completed-stream entries (the hub counts its own).
        self.completed_malformed = [0]
        self._label_sets: set[tuple[str, str]] = set()
        self._children: dict[tuple[str, str, str], tuple[Any, Any, Any, Any]] = {}
        self._last_seen: dict[str, float] = {}  # worker label -> monotonic time of life

    def series(self) -> list[Collector]:
        return [self.requests, self.duration, self.ttfb, self.ttft, self.cancelled]

    def observe(self, entry: schema.CompletedEntry) -> None:
        worker, model = entry["worker_id"], entry["model"] or schema.UNKNOWN_MODEL
        if (worker, model) not in self._label_sets:
            if len(self._label_sets) >= MAX_LABEL_SETS:
                worker, model = OTHER, OTHER
            else:
                self._label_sets.add((worker, model))
        self._last_seen[worker] = time.monotonic()
        # `labels()` validates and looks up its arguments on every call; the hub observes every
        # finished request, so the children are kept (bounded like the label sets themselves).
        outcome = entry["outcome"]
        key = (worker, model, outcome)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(worker, model, outcome),
                self.duration.labels(worker, model),
                self.ttfb.labels(worker, model),
                self.ttft.labels(worker, model),
            )
        children[0].inc()
        children[1].observe(entry["duration_ms"] / 1000.0)
        # Decoded entries hold a finite number >= 0 or None (absent in older workers' entries).
        ttfb = entry.get("ttfb_ms")
        if ttfb is not None:
            children[2].observe(ttfb / 1000.0)
        ttft = ttft_of(entry)
        if ttft is not None:
            children[3].observe(ttft / 1000.0)
        if outcome == "cancelled":
            self.cancelled.labels(worker).inc()

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
        for key in [k for k in self._children if k[0] in gone]:
            worker, model, outcome = key
            del self._children[key]
            with contextlib.suppress(KeyError):
                self.requests.remove(worker, model, outcome)
            for metric in (self.duration, self.ttfb, self.ttft):
                with contextlib.suppress(KeyError):
                    metric.remove(worker, model)
        for wid in gone:
            with contextlib.suppress(KeyError):
                self.cancelled.remove(wid)
        self._label_sets = {k for k in self._label_sets if k[0] not in gone}

    def malformed_completed(self, _detail: object) -> None:
        self.completed_malformed[0] += 1
