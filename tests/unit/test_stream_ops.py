"""The operator side of the stream service on fakeredis: the reaper racing a heartbeat, the
supervisor of background loops, the Prometheus series for TTFT, stuck and cancelled requests,
and the capped, TTFT-aware stats payload."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import generate_latest

from vdm_hub.services.stream import metrics as metrics_mod
from vdm_hub.services.stream.fanout import Broadcaster
from vdm_hub.services.stream.hub import READER, Hub, WorkerView
from vdm_hub.services.stream.metrics import RequestMetrics, StreamMetrics
from vdm_hub.services.stream.stats import MAX_GROUPS, OTHER, RollingStats, flight_summary
from vdm_hub.services.stream.supervise import TaskSupervisor
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.settings import Settings
from vdm_hub.shared.store import WireScripts

pytestmark = pytest.mark.timeout(30)


def _record(wid: str, epoch: str, **extra: Any) -> schema.WorkerRecord:
    record = schema.WorkerRecord(
        worker_id=wid, host="h", pid=1, started_at=time.time(), upstream="", version="",
        epoch=epoch, heartbeat_interval=2.0, ttl=10.0,
    )  # fmt: skip
    record.update(extra)  # type: ignore[typeddict-item]
    return record


def _row(wid: str, rid: str, model: str | None = "m", age: float = 0.0) -> schema.Row:
    return schema.Row(
        request_id=rid, worker_id=wid, method="POST", path="/v1/x", model=model,
        provider=None, is_streaming=False, start_time=time.time() - age, phase="upstream",
        bytes_out=0, input_tokens=None, output_tokens=None,
    )  # fmt: skip


def _entry(
    wid: str,
    model: str | None,
    ms: float,
    outcome: str = "ok",
    ttft: float | None = None,
    start: float | None = None,
    ttfb: float | None = None,
) -> schema.Finished:
    start = time.time() - ms / 1000 if start is None else start
    return schema.Finished(wid, model, outcome, start, ms, ttft, ttfb)


# ----------------------------------------------------------------- reaper


async def test_reap_once_keeps_a_worker_whose_heartbeat_beat_the_reaper(
    fake_redis: aioredis.Redis,
) -> None:
    keys = Keys("reap")
    hub = Hub(fake_redis, keys)
    scripts = WireScripts(fake_redis, keys)
    # Registered with a deadline already past (on Redis's clock): the reaper sees it expired.
    await scripts.register(
        _record("w", "e1"), [("r1", schema.encode_row(_row("w", "r1")))], ttl_ms=-1
    )
    await hub.full_resync()
    hub.sync.clear(READER)  # what Hub.run does once subscribed and resynced
    assert set(hub.workers["w"].rows) == {"r1"}

    real_remove = hub.scripts.remove

    async def heartbeat_first(worker_id: str, **kwargs: Any) -> int:
        # The heartbeat lands between the reaper's read of the deadlines and its remove.
        assert await scripts.heartbeat(worker_id, "e1", ttl_ms=10_000)
        return await real_remove(worker_id, **kwargs)

    hub.scripts.remove = heartbeat_first  # type: ignore[method-assign]
    await hub.reap_once()
    assert hub.counters.reaped == 0
    assert "w" in hub.workers, "a live worker was dropped from the view"
    assert set(hub.workers["w"].rows) == {"r1"}


async def test_reap_once_drops_a_worker_another_reaper_removed(fake_redis: aioredis.Redis) -> None:
    keys = Keys("reap2")
    hub = Hub(fake_redis, keys)
    scripts = WireScripts(fake_redis, keys)
    await scripts.register(_record("w", "e1"), [], ttl_ms=-1)
    await hub.full_resync()
    hub.sync.clear(READER)
    real_remove = hub.scripts.remove

    async def other_reaper_first(worker_id: str, **kwargs: Any) -> int:
        assert await real_remove(worker_id, **kwargs)  # the other service's reaper
        return await real_remove(worker_id, **kwargs)  # ours finds nothing left

    hub.scripts.remove = other_reaper_first  # type: ignore[method-assign]
    await hub.reap_once()
    assert "w" not in hub.workers


# ----------------------------------------------------------------- supervisor


async def test_supervisor_logs_marks_failing_restarts_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs: list[int] = []
    crashed: list[int] = []
    forever = asyncio.Event()

    async def job() -> None:
        runs.append(1)
        if len(runs) <= 2:
            raise KeyError("injected")
        await forever.wait()

    sup = TaskSupervisor(settle=0.2)
    sup.add("job", job, on_crash=lambda: crashed.append(1))
    sup.start()
    try:
        deadline = time.monotonic() + 10
        while not (len(runs) >= 3 and sup.healthy):
            assert time.monotonic() < deadline, (runs, sup.failing)
            if len(runs) < 3:
                await asyncio.sleep(0.01)
                continue
            await asyncio.sleep(0.02)
        assert sup.jobs[0].restarts == 2 and len(crashed) == 2
        assert "background task job crashed" in caplog.text and "KeyError" in caplog.text
    finally:
        await sup.stop()
    assert all(t.done() for t in sup.tasks)


async def test_supervisor_is_failing_between_crash_and_settled_restart() -> None:
    gate = asyncio.Event()

    async def job() -> None:
        if not gate.is_set():
            gate.set()
            raise RuntimeError("injected")
        await asyncio.Event().wait()

    sup = TaskSupervisor(settle=30.0)  # the restarted run does not settle within the test
    sup.add("job", job)
    sup.start()
    try:
        await asyncio.wait_for(gate.wait(), 5)
        deadline = time.monotonic() + 5
        while sup.jobs[0].restarts == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert not sup.healthy and sup.failing == {"job"}
    finally:
        await sup.stop()


async def test_a_loop_that_returns_counts_as_a_failure() -> None:
    calls: list[int] = []

    async def job() -> None:
        calls.append(1)

    sup = TaskSupervisor(settle=10.0, backoff_max=0.1)
    sup.add("quitter", job)
    sup.start()
    try:
        deadline = time.monotonic() + 5
        while len(calls) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert sup.failing == {"quitter"}
    finally:
        await sup.stop()


# ----------------------------------------------------------------- Prometheus


def _metrics_with(hub: Hub, stuck_after: float = 60.0) -> tuple[StreamMetrics, RequestMetrics]:
    finished = RequestMetrics()
    bc = Broadcaster(hub, interval=30, heartbeat=30, throttle=0.1, max_clients=1)
    return StreamMetrics(hub, bc, finished, stuck_after=stuck_after), finished


def _samples(m: StreamMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in m.registry.collect():
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_ttfb_ttft_cancelled_stuck_oldest_dropped_and_missed(
    fake_redis: aioredis.Redis,
) -> None:
    hub = Hub(fake_redis, Keys("m"))
    view = WorkerView("w1", "e", 1, _record("w1", "e", events_dropped=187, completed_dropped=42))
    view.rows = {
        "old": _row("w1", "old", age=120.0),
        "new": _row("w1", "new", age=1.0),
    }
    hub.workers["w1"] = view
    hub.workers["w2"] = WorkerView("w2", "e", 1, _record("w2", "e"))
    hub.counters.dropped_by_worker.update({"w1": 3, "gone": 9})
    m, finished = _metrics_with(hub, stuck_after=60.0)
    finished.observe(_entry("w1", "gpt", 500.0, ttft=250.0, ttfb=20.0))
    finished.observe(_entry("w1", "gpt", 800.0))  # an older worker: neither field
    finished.observe(_entry("w1", "gpt", 900.0, outcome="cancelled", ttft=100.0, ttfb=30.0))
    finished.observe(_entry("w1", "gpt", 50.0, ttfb=40.0))  # a stream cut before its first token
    s = _samples(m)
    labels = (("model", "gpt"), ("worker", "w1"))
    assert s[("vdm_time_to_first_byte_seconds_count", labels)] == 3
    assert s[("vdm_time_to_first_byte_seconds_sum", labels)] == pytest.approx(0.09)
    assert s[("vdm_time_to_first_token_seconds_count", labels)] == 2
    assert s[("vdm_time_to_first_token_seconds_sum", labels)] == pytest.approx(0.35)
    assert s[("vdm_request_duration_seconds_count", labels)] == 4
    assert s[("vdm_requests_cancelled_total", (("worker", "w1"),))] == 1
    assert s[("vdm_requests_stuck", (("worker", "w1"),))] == 1
    assert s[("vdm_requests_stuck", (("worker", "w2"),))] == 0
    assert 119 < s[("vdm_oldest_request_age_seconds", (("worker", "w1"),))] < 200
    assert s[("vdm_oldest_request_age_seconds", (("worker", "w2"),))] == 0
    # The worker's own count of what it could not publish, and the hub's gaps, apart.
    assert s[("vdm_worker_events_dropped_total", (("worker", "w1"),))] == 187
    assert s[("vdm_worker_events_dropped_total", (("worker", "w2"),))] == 0
    assert s[("vdm_completed_dropped_total", (("worker", "w1"),))] == 42
    assert s[("vdm_completed_dropped_total", (("worker", "w2"),))] == 0
    assert s[("vdm_batches_missed_total", (("worker", "w1"),))] == 3
    assert ("vdm_batches_missed_total", (("worker", "gone"),)) not in s
    assert b"vdm_requests_cancelled_total" in generate_latest(m.registry)


async def test_stalled_streams_are_counted_per_worker(fake_redis: aioredis.Redis) -> None:
    hub = Hub(fake_redis, Keys("m"))
    now = time.time()

    def stream(rid: str, **fields: Any) -> schema.Row:
        row = _row("w1", rid, age=120.0)
        row.update({"is_streaming": True, "phase": "streaming", "ttft_ms": 800.0,  # type: ignore[typeddict-item]
                    "chunks_out": 5, **fields})  # fmt: skip
        return row

    view = WorkerView("w1", "e", 1, _record("w1", "e"))
    view.rows = {
        "silent": stream("silent", last_output_at=now - 45),  # silent 45 s: stalled
        "talking": stream("talking", last_output_at=now - 2),
        "waiting": stream("waiting", ttft_ms=None, last_output_at=None),  # no first token yet
        "old-worker": stream("old-worker"),  # no last_output_at at all: never stalled
        "plain": _row("w1", "plain", age=120.0),  # not a stream
    }
    view.rows["sse"] = stream("sse", is_streaming=False, last_output_at=now - 40)  # SSE answer
    hub.workers["w1"] = view
    hub.workers["w2"] = WorkerView("w2", "e", 1, _record("w2", "e"))
    finished = RequestMetrics()
    bc = Broadcaster(hub, interval=30, heartbeat=30, throttle=0.1, max_clients=1)
    s = _samples(StreamMetrics(hub, bc, finished, stall_after=30.0))
    assert s[("vdm_requests_stalled", (("worker", "w1"),))] == 2
    assert s[("vdm_requests_stalled", (("worker", "w2"),))] == 0


async def test_series_of_departed_workers_are_pruned(
    fake_redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = Hub(fake_redis, Keys("p"))
    hub.workers["w1"] = WorkerView("w1", "e", 1, _record("w1", "e"))
    m, finished = _metrics_with(hub)
    finished.observe(_entry("w1", "gpt", 10.0, outcome="cancelled", ttft=1.0))
    finished.observe(_entry("w9", "gpt", 10.0))  # a worker the view no longer holds
    text = generate_latest(m.registry).decode()
    assert 'worker="w9"' in text
    later = time.monotonic() + metrics_mod.PRUNE_AFTER + 1
    monkeypatch.setattr(metrics_mod.time, "monotonic", lambda: later)
    del hub.workers["w1"]
    hub.workers["w2"] = WorkerView("w2", "e", 1, _record("w2", "e"))
    text = generate_latest(m.registry).decode()
    assert 'worker="w9"' not in text and 'worker="w1"' not in text
    assert 'worker="w2"' in text


async def test_in_flight_series_are_capped(fake_redis: aioredis.Redis) -> None:
    hub = Hub(fake_redis, Keys("c"))
    view = WorkerView("w1", "e", 1, _record("w1", "e"))
    n = metrics_mod.MAX_LABEL_SETS + 50
    view.rows = {f"r{i}": _row("w1", f"r{i}", model=f"m{i}") for i in range(n)}
    hub.workers["w1"] = view
    s = _samples(_metrics_with(hub)[0])
    in_flight = {k: v for k, v in s.items() if k[0] == "vdm_requests_in_flight"}
    assert len(in_flight) == metrics_mod.MAX_LABEL_SETS + 1
    assert sum(in_flight.values()) == n
    assert in_flight[("vdm_requests_in_flight", (("model", "other"), ("worker", "other")))] == 50


async def test_stats_and_the_in_flight_gauge_count_the_same_rows(
    fake_redis: aioredis.Redis,
) -> None:
    hub = Hub(fake_redis, Keys("f"))
    busy = WorkerView("w1", "e", 1, _record("w1", "e"))
    busy.rows = {
        "a": _row("w1", "a", "gpt"),
        "b": _row("w1", "b", "gpt"),
        "c": _row("w1", "c", None),
    }
    hub.workers["w1"] = busy
    hub.workers["idle"] = WorkerView("idle", "e", 1, _record("idle", "e"))
    assert hub.in_flight() == {"w1": {"gpt": 2, schema.UNKNOWN_MODEL: 1}, "idle": {}}
    flight = flight_summary(hub.in_flight())
    assert flight == {
        "fleet": 3,
        "by_worker": {"w1": 3, "idle": 0},  # an idle worker still has its group
        "by_model": {"gpt": 2, schema.UNKNOWN_MODEL: 1},
    }
    gauge = {
        dict(labels)["model"]: v
        for (name, labels), v in _samples(_metrics_with(hub)[0]).items()
        if name == "vdm_requests_in_flight"
    }
    assert gauge == {"gpt": 2, schema.UNKNOWN_MODEL: 1}


# ----------------------------------------------------------------- stats payload


async def test_stats_carry_ttft_percentiles(fake_redis: aioredis.Redis) -> None:
    stats = RollingStats(fake_redis, Keys("s"), step=1.0)
    now = time.time()
    for i, ttft in enumerate([100.0, 200.0, 300.0, None]):
        stats.add(_entry("w1", "m1", 1000.0, ttft=ttft, start=now - 5 - i), now)
    s = stats.tick(now)
    assert (s["fleet"]["ttft_p50_ms"], s["fleet"]["ttft_p95_ms"]) == (200.0, 300.0)
    assert s["fleet"]["completed"] == 4
    assert s["by_model"]["m1"]["ttft_p50_ms"] == 200.0
    assert s["by_worker"]["w1"]["ttft_p95_ms"] == 300.0
    with_ttft = [p for p in s["series"] if p["ttft_p50_ms"] is not None]
    assert len(with_ttft) == 3
    assert {"ttft_p50_ms", "ttft_p95_ms"} <= set(s["series"][0])


async def test_30000_model_names_make_a_bounded_stats_frame(fake_redis: aioredis.Redis) -> None:
    flight = {"fleet": 2, "by_worker": {"w1": 2}, "by_model": {"busy": 1, "inflight-only": 1}}
    stats = RollingStats(fake_redis, Keys("s2"), step=1.0, in_flight=lambda: flight)
    now = time.time()
    for i in range(30_000):
        stats.add(_entry("w1", f"model-{i:05d}", 10.0), now)
    for _ in range(5):
        stats.add(_entry("w1", "busy", 10.0), now)
    s = stats.tick(now)
    frame = orjson.dumps(s)
    assert len(frame) < 64 * 1024, len(frame)
    assert len(s["by_model"]) == MAX_GROUPS + 1
    assert s["by_model"]["busy"]["completed"] == 5 and s["by_model"]["busy"]["in_flight"] == 1
    total = sum(g["completed"] for g in s["by_model"].values())
    assert total == s["fleet"]["completed"] == 30_005
    assert sum(g["in_flight"] for g in s["by_model"].values()) == 2
    assert s["by_model"][OTHER]["completed"] > 29_000


# ----------------------------------------------------------------- cancel's origin check


def _request(headers: dict[str, str], scheme: str = "http") -> Any:
    from starlette.requests import Request

    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "scheme": scheme, "headers": raw, "method": "POST"})


def test_origin_check_allows_configured_origins_only() -> None:
    from vdm_hub.services.stream.cancel import origin_allowed, valid_request_id

    listed = Settings.from_env({"VDM_CORS_ORIGINS": "http://localhost:8050"})
    cookie = {"cookie": "vdm_session=v1.1.x", "host": "stream.example:8090"}
    assert origin_allowed(_request({**cookie, "origin": "http://LOCALHOST:8050"}), listed)
    assert origin_allowed(
        _request({**cookie, "referer": "http://localhost:8050/dashboard/"}), listed
    )
    assert not origin_allowed(_request({**cookie, "origin": "http://localhost:8051"}), listed)
    assert not origin_allowed(_request({**cookie, "origin": "null"}), listed)
    assert not origin_allowed(_request({**cookie, "referer": "garbage"}), listed)
    assert not origin_allowed(_request(cookie), listed)  # a cookie without any origin
    # The Host header is never the judge: a page of the service's own Host is not trusted...
    assert not origin_allowed(_request({**cookie, "origin": "http://stream.example:8090"}), listed)
    # ...unless that origin is the configured public URL (a proxy serving both on one origin),
    # written with or without its default port.
    public = Settings.from_env({"VDM_STREAM_PUBLIC_URL": "https://hub.example:443/"})
    rewritten = {**cookie, "host": "stream:8090", "origin": "https://hub.example"}
    assert origin_allowed(_request(rewritten), public)
    assert origin_allowed(_request({"host": "s"}), listed)  # a command-line client, no cookie
    anyone = Settings.from_env({"VDM_CORS_ORIGINS": "*"})
    assert not origin_allowed(_request({"host": "s", "origin": "http://evil"}), anyone)
    # Neither does an any-host entry (read access for remote dashboards) let a page cancel.
    any_host = Settings.from_env({"VDM_CORS_ORIGINS": "http://*:8050"})
    assert not origin_allowed(_request({"origin": "http://evil.example:8050"}), any_host)
    assert valid_request_id("req-1:a.b_c") and not valid_request_id("")
    assert not valid_request_id("a b") and not valid_request_id("x" * 129)
