"""Prometheus metrics of one stream service (names fixed by design.md section 5).

Gauges derived from the hub's state are computed at scrape time by a collector, so the hot
paths (batch apply, fan-out) pay nothing for them. Only the completed-requests counter and
duration histogram are updated as entries arrive (once per finished request).

- ``vdm_hub_lag_seconds``: how far behind the hub is, measured as now minus the ``start_time``
  of the newest ``start`` event applied (it includes the worker's batching delay).
- ``vdm_worker_events_dropped_total{worker}``: batches a worker published that this hub never
  saw (sequence gaps; each gap was healed by a resync of that worker).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shared import schema

if TYPE_CHECKING:
    from services.stream.fanout import Broadcaster
    from services.stream.hub import Hub

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
# Label values come from untrusted input; cap how many distinct series a bad actor can create.
MAX_LABEL_SETS = 5000
OTHER = "other"


class HubCollector(Collector):
    def __init__(self, hub: Hub | None, bc: Broadcaster, extra_malformed: list[int]) -> None:
        self.hub = hub
        self.bc = bc
        self.extra_malformed = extra_malformed

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        in_flight = GaugeMetricFamily(
            "vdm_requests_in_flight", "Requests in flight", labels=["worker", "model"]
        )
        workers = GaugeMetricFamily("vdm_workers", "Known workers by status", labels=["status"])
        dropped = CounterMetricFamily(
            "vdm_worker_events_dropped",
            "Batches a worker published that this hub missed (sequence gaps)",
            labels=["worker"],
        )
        lag = GaugeMetricFamily("vdm_hub_lag_seconds", "Now minus the newest applied start")
        malformed = CounterMetricFamily(
            "vdm_messages_malformed", "Malformed messages and hash entries skipped"
        )
        clients = GaugeMetricFamily("vdm_sse_clients", "Open SSE streams")
        clients.add_metric([], self.bc.clients)
        hub = self.hub
        bad = sum(self.extra_malformed)
        if hub is not None:
            by_status = {"up": 0, "stale": 0}
            for wid, view in hub.workers.items():
                by_status[view.status] = by_status.get(view.status, 0) + 1
                counts: dict[str, int] = {}
                for row in view.rows.values():
                    model = row["model"] or "unknown"
                    counts[model] = counts.get(model, 0) + 1
                for model, n in counts.items():
                    in_flight.add_metric([wid, model], n)
            for status, n in by_status.items():
                workers.add_metric([status], n)
            for wid, n in hub.counters.dropped_by_worker.items():
                dropped.add_metric([wid], n)
            lag.add_metric([], hub.counters.last_lag_s)
            bad += hub.counters.malformed
        malformed.add_metric([], bad)
        yield in_flight
        yield workers
        yield clients
        yield lag
        yield malformed
        yield dropped


class StreamMetrics:
    """The registry of one app (not the global one, so several apps can live in one test)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "vdm_requests",
            "Finished requests",
            ["worker", "model", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "vdm_request_duration_seconds",
            "Duration of finished requests",
            ["worker", "model"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        # Malformed completed-stream entries (the hub counts its own).
        self.completed_malformed = [0]
        self._label_sets: set[tuple[str, str]] = set()
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def attach(self, hub: Hub | None, bc: Broadcaster) -> None:
        self.registry.register(HubCollector(hub, bc, self.completed_malformed))

    def observe(self, entry: schema.CompletedEntry) -> None:
        worker, model = entry["worker_id"], entry["model"] or "unknown"
        if (worker, model) not in self._label_sets:
            if len(self._label_sets) >= MAX_LABEL_SETS:
                worker, model = OTHER, OTHER
            else:
                self._label_sets.add((worker, model))
        # `labels()` validates and looks up its arguments on every call; the hub observes every
        # finished request, so the children are kept (bounded like the label sets themselves).
        key = (worker, model, entry["outcome"])
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(worker, model, entry["outcome"]),
                self.duration.labels(worker, model),
            )
        children[0].inc()
        children[1].observe(entry["duration_ms"] / 1000.0)

    def malformed_completed(self, _detail: object) -> None:
        self.completed_malformed[0] += 1
