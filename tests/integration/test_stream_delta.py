"""Stream contract v2 against a real server and real Redis: deltas, resume, snapshot pacing."""

from __future__ import annotations

import asyncio
import itertools
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from tests.stream_support import (
    DeltaState,
    FakeWorker,
    SSEReader,
    hub_truth,
    keyed,
    request_ids,
    running_stream,
    same_rows,
    settings_for,
    wait_ready,
    wait_until,
)
from vdm_hub.services.stream.table import row_key
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

STREAM = "/metrics/active-requests/stream"
DELTA = STREAM + "?delta=1"


async def redis_truth(redis: aioredis.Redis, keys: Keys, *worker_ids: str) -> dict[str, Any]:
    rows: list[schema.Row] = []
    for wid in worker_ids:
        for raw in (await redis.hgetall(keys.active(wid))).values():  # type: ignore[misc]
            rows.append(schema.decode_row(raw))
    return keyed(rows)


def deltas(reader: SSEReader, start: int = 0) -> list[dict[str, Any]]:
    return [orjson.loads(e.data) for _, e in reader.events[start:] if e.event == "delta"]


async def test_snapshot_then_chained_deltas_reproduce_the_truth(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    w1, w2 = FakeWorker(redis, keys, "w1"), FakeWorker(redis, keys, "w2")
    await w1.register()
    await w1.start("a1", "a2")
    async with running_stream(settings_for(redis_url, key_prefix)) as (url, app):
        await wait_ready(url)
        async with SSEReader(url + DELTA) as reader:
            first = reader.events[0][1]
            assert first.event == "update"
            assert request_ids(orjson.loads(first.data)) == {"a1", "a2"}
            await w2.register()
            await w2.start("b1", "b2", "b3")
            await w1.end("a1")
            await w2.progress("b2", phase="streaming", bytes_out=42)
            await w1.start("a3")
            await w2.end("b3")
            await w1.start("b3")  # an id that ended on one worker starts again on another

            # replay() asserts that every delta's base is the version held before it.
            def counts(workers: list[dict[str, Any]]) -> dict[str, int]:
                return {w["worker_id"]: w["active"] for w in workers}

            def caught_up() -> bool:
                state = DeltaState.replay(reader)
                hub = app.state.hub
                return same_rows(state.rows, hub_truth(app)) and counts(state.workers) == {
                    wid: len(view.rows) for wid, view in hub.workers.items()
                }

            await wait_until(caught_up, 10, "the delta client to reproduce the hub's state")
            state = DeltaState.replay(reader)
            truth = await redis_truth(redis, keys, "w1", "w2")
            assert {r["request_id"] for r in truth.values()} == {"a2", "a3", "b1", "b2", "b3"}
            assert same_rows(state.rows, truth)
            assert state.rows[row_key("w2", "b2")]["bytes_out"] == 42
            assert row_key("w1", "b3") in state.rows and row_key("w2", "b3") not in state.rows
            assert counts(state.workers) == {"w1": 3, "w2": 2}
            kinds = [e.event for _, e in reader.events if e.event in ("update", "delta")]
            assert kinds[0] == "update" and set(kinds[1:]) == {"delta"}


async def test_idle_stream_sends_an_empty_delta_every_interval(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    worker = FakeWorker(redis, keys, "w1")
    await worker.register()
    await worker.start("r1")
    settings = settings_for(redis_url, key_prefix, VDM_ACTIVE_REQUESTS_SSE_INTERVAL="0.2")
    async with running_stream(settings) as (url, _app), SSEReader(url + DELTA) as reader:
        await _version_after(reader, "r1")  # the initial load is out
        n = len(reader.events)
        await wait_until(lambda: len(deltas(reader, n)) >= 3, 10, "three idle deltas")
        state = DeltaState.replay(reader)
        assert set(state.rows) == {row_key("w1", "r1")}
        for delta in deltas(reader, n)[:3]:
            assert delta["upsert"] == [] and delta["remove"] == []
            assert delta["base"] == delta["version"] == state.version
            assert "workers" not in delta
            assert isinstance(delta["timestamp"], float)
        stamps = [d["timestamp"] for d in deltas(reader)]
        assert stamps == sorted(stamps)


async def test_workers_ride_in_a_delta_only_when_the_list_changed(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    worker = FakeWorker(redis, keys, "w1")
    await worker.register()
    await worker.start("r1")
    settings = settings_for(redis_url, key_prefix, VDM_ACTIVE_REQUESTS_SSE_INTERVAL="30")
    async with running_stream(settings) as (url, _app), SSEReader(url + DELTA) as reader:
        await _version_after(reader, "r1")  # the initial load is out
        n = len(reader.events)
        await worker.progress("r1", bytes_out=7)  # a row changes, the worker list does not
        event = await reader.wait(lambda e: e.event == "delta", 5, after=n)
        data = orjson.loads(event.data)
        assert [r["bytes_out"] for r in data["upsert"]] == [7] and "workers" not in data
        n = len(reader.events)
        await worker.start("r2")  # w1's active count changes (counts go at most every 0.25 s)
        event = await reader.wait(
            lambda e: e.event == "delta" and "workers" in orjson.loads(e.data), 5, after=n
        )
        assert [w["active"] for w in orjson.loads(event.data)["workers"]] == [2]
        n = len(reader.events)
        other = FakeWorker(redis, keys, "w2")
        await other.register()  # a new worker
        event = await reader.wait(
            lambda e: e.event == "delta" and "workers" in orjson.loads(e.data), 5, after=n
        )
        assert [w["worker_id"] for w in orjson.loads(event.data)["workers"]] == ["w1", "w2"]


async def _version_after(reader: SSEReader, rid: str, wid: str = "w1") -> int:
    """The version of the first frame after which the client holds ``rid`` of ``wid``."""
    key = row_key(wid, rid)
    await wait_until(lambda: key in DeltaState.replay(reader).rows, 5, f"{rid} on the stream")
    version = DeltaState.replay(reader).version
    assert version is not None
    return version


async def test_last_event_id_inside_the_ring_resumes_with_a_delta_from_it(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    worker = FakeWorker(redis, keys, "w1")
    await worker.register()
    await worker.start("keep", "gone")
    settings = settings_for(redis_url, key_prefix, VDM_ACTIVE_REQUESTS_SSE_INTERVAL="30")
    async with running_stream(settings) as (url, app):
        await wait_ready(url)
        async with SSEReader(url + DELTA) as reader:
            await _version_after(reader, "gone")
            held = DeltaState.replay(reader).version
        await worker.end("gone")
        await worker.start("new")
        expected = {row_key("w1", "keep"), row_key("w1", "new")}
        await wait_until(lambda: set(hub_truth(app)) == expected, 5, "hub caught up")
        # EventSource's own reconnect sends the header; a new EventSource (the page's
        # backoff) can only put it in the query.
        for path, headers in (
            (DELTA, {"Last-Event-ID": str(held)}),
            (f"{DELTA}&last_event_id={held}", {}),
        ):
            async with SSEReader(url + path, headers=headers) as again:
                first = again.events[0][1]
                assert first.event == "delta"
                data = orjson.loads(first.data)
                assert data["base"] == held
                assert data["remove"] == [row_key("w1", "gone")]
                assert request_ids({"active_requests": data["upsert"]}) == {"new"}
                resumed = DeltaState.replay(reader)
                resumed.apply(first)
                assert same_rows(resumed.rows, hub_truth(app))


@pytest.mark.parametrize(
    ("last_event_id", "in_query"),
    [
        ("garbage", False),
        ("-3", False),
        ("12345678901234567890123", False),
        ("future", False),
        ("%C2%B2", True),  # a superscript two: str.isdigit() says yes, int() says no
        ("", True),
    ],
)
async def test_unusable_last_event_id_gets_a_snapshot(
    redis: aioredis.Redis,
    keys: Keys,
    redis_url: str,
    key_prefix: str,
    last_event_id: str,
    in_query: bool,
) -> None:
    worker = FakeWorker(redis, keys, "w1")
    await worker.register()
    await worker.start("r1")
    async with running_stream(settings_for(redis_url, key_prefix)) as (url, app):
        await wait_ready(url)
        if last_event_id == "future":
            last_event_id = str(app.state.broadcaster.version + 1000)
        path, headers = DELTA, {"Last-Event-ID": last_event_id}
        if in_query:
            path, headers = f"{DELTA}&last_event_id={last_event_id}", {}
        async with SSEReader(url + path, headers=headers) as reader:
            assert reader.response is not None and reader.response.status_code == 200
            first = reader.events[0][1]
            assert first.event == "update"
            assert request_ids(orjson.loads(first.data)) == {"r1"}


async def test_last_event_id_outside_the_ring_gets_a_snapshot(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    worker = FakeWorker(redis, keys, "w1")
    await worker.register()
    settings = settings_for(redis_url, key_prefix, VDM_ACTIVE_REQUESTS_SSE_INTERVAL="30")
    async with running_stream(settings) as (url, app):
        await wait_ready(url)
        bc = app.state.broadcaster
        bc.ring.max_versions = 3  # a small ring, so a few changes push a version out of it
        async with SSEReader(url + DELTA) as reader:
            await worker.start("r0")
            held = await _version_after(reader, "r0")
        for n in range(1, 8):
            await worker.start(f"r{n}")
            key = row_key("w1", f"r{n}")
            await wait_until(lambda key=key: key in bc.table.entries, 5, f"r{n} published")
        assert not bc.ring.covers(held)
        async with SSEReader(url + DELTA, headers={"Last-Event-ID": str(held)}) as reader:
            first = reader.events[0][1]
            assert first.event == "update"
            assert request_ids(orjson.loads(first.data)) == {f"r{n}" for n in range(8)}


async def test_a_snapshot_client_is_paced_to_its_budget_and_ends_on_the_truth(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    bps = 20_000
    worker = FakeWorker(redis, keys, "w1")
    await worker.register()
    await worker.start(*(f"bulk-{i:03d}" for i in range(80)))  # a ~25 KB snapshot
    settings = settings_for(
        redis_url,
        key_prefix,
        VDM_SSE_SNAPSHOT_MAX_BPS=str(bps),
        VDM_ACTIVE_REQUESTS_SSE_INTERVAL="0.2",
    )
    async with running_stream(settings) as (url, app), SSEReader(url + STREAM) as reader:
        for n in range(30):  # churn: far more changes than the budget lets through
            await worker.start(f"c{n}")
            if n % 3 == 0:
                await worker.end(f"c{n}")
            await asyncio.sleep(0.03)
        await worker.end("bulk-000")

        def on_truth() -> bool:
            updates = reader.updates()
            return bool(updates) and same_rows(
                {r["key"]: r for r in updates[-1]["active_requests"]}, hub_truth(app)
            )

        await wait_until(on_truth, 20, "the paced client to reach the true state")
        frames = [
            (orjson.loads(e.data), len(e.data)) for _, e in reader.events if e.event == "update"
        ]
        assert len(frames) >= 2
        # Server-side build times (not arrival times, which a loaded machine bunches up):
        # after an update of N bytes the next one waited at least N / bps.
        for (data, size), (later, _) in itertools.pairwise(frames):
            assert later["timestamp"] - data["timestamp"] >= size / bps * 0.95 - 0.005


async def test_pollers_share_one_snapshot_per_version_and_one_summary_per_period(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    worker = FakeWorker(redis, keys, "w1")
    await worker.register()
    await worker.start("r1", "r2")
    settings = settings_for(redis_url, key_prefix, VDM_ACTIVE_REQUESTS_SSE_INTERVAL="30")
    async with running_stream(settings) as (url, app), httpx.AsyncClient(base_url=url) as client:
        await wait_ready(url)
        bc = app.state.broadcaster
        memo = app.state.summary_memo
        built, publishes, summaries = bc.snapshots, bc.update_gen, memo.computed
        answers = await asyncio.gather(
            *(client.get("/metrics/active-requests") for _ in range(40)),
            *(client.get("/metrics/summary") for _ in range(40)),
        )
        assert all(a.status_code == 200 for a in answers)
        assert all(request_ids(a.json()) == {"r1", "r2"} for a in answers[:40])
        # At most one build per publish in between (plus the one before it), not one per poll.
        assert bc.snapshots - built <= bc.update_gen - publishes + 1
        assert memo.computed - summaries <= 2
        await worker.start("r3")  # a new version: the next poll sees it, not a stale cache
        await wait_until(lambda: "r3" in app.state.hub.workers["w1"].rows, 5, "r3 in the hub")
        snap = (await client.get("/metrics/active-requests")).json()
        assert request_ids(snap) == {"r1", "r2", "r3"}


@pytest.mark.timeout(60)
async def test_a_delta_client_that_never_reads_is_dropped_and_delays_no_one(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    worker = FakeWorker(redis, keys, "w1")
    await worker.register()
    await worker.start(*(f"bulk-{i:05d}" for i in range(1000)))  # a ~250 KB first frame
    settings = settings_for(redis_url, key_prefix, VDM_SSE_SEND_TIMEOUT="1.0")
    async with running_stream(settings) as (url, app):
        await wait_ready(url)
        bc = app.state.broadcaster
        parts = urlsplit(url)
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            stuck.connect((parts.hostname, parts.port))
            stuck.sendall(f"GET {DELTA} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
            async with SSEReader(url + DELTA) as reader:
                await wait_until(lambda: bc.clients == 2, 5, "2 clients")
                # Deltas of 500 new rows (~125 KB each) until the stuck client's buffers are
                # full and its send blocks; the reading client sees every batch meanwhile.
                state, seen, n = DeltaState(), 0, 0

                def holds(rid: str) -> bool:
                    nonlocal seen
                    seen = state.apply_all(reader, seen)  # incremental: asserts each base
                    return row_key("w1", rid) in state.rows

                while bc.dropped == 0:
                    assert n < 200, "the stuck client was never dropped"
                    await worker.start(*(f"b{n}-{i:03d}" for i in range(500)))
                    await wait_until(lambda n=n: holds(f"b{n}-499"), 10, f"batch {n} seen")
                    n += 1
                assert len(state.rows) == 1000 + 500 * n
                await wait_until(lambda: bc.clients == 1, 5, "1 client left")
                assert not reader.ended
        finally:
            stuck.close()


async def _in_flight_gauge(client: httpx.AsyncClient) -> dict[str, float]:
    """``vdm_requests_in_flight`` summed per worker, as Prometheus would scrape it."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get("/metrics")).text
    per: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "vdm_requests_in_flight":
            for sample in family.samples:
                wid = sample.labels["worker"]
                per[wid] = per.get(wid, 0.0) + sample.value
    return {wid: n for wid, n in per.items() if n}


async def test_one_request_id_on_two_workers_is_two_rows_and_each_ends_alone(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    # A client's retry that lands on another worker: one X-Request-Id on two workers (issue 20).
    w1, w2 = FakeWorker(redis, keys, "w1"), FakeWorker(redis, keys, "w2")
    await w1.register()
    await w2.register()
    one, two = row_key("w1", "dup"), row_key("w2", "dup")
    settings = settings_for(redis_url, key_prefix, VDM_ACTIVE_REQUESTS_SSE_INTERVAL="30")
    async with (
        running_stream(settings) as (url, _app),
        httpx.AsyncClient(base_url=url) as http,
    ):
        await wait_ready(url)
        async with SSEReader(url + DELTA) as deltas_, SSEReader(url + STREAM) as snapshots:
            await w1.start("dup")
            await w2.start("dup")
            await wait_until(
                lambda: set(DeltaState.replay(deltas_).rows) == {one, two}, 5, "two rows"
            )

            def last_update() -> dict[str, dict[str, Any]]:
                updates = snapshots.updates()
                return {r["key"]: r for r in updates[-1]["active_requests"]} if updates else {}

            await wait_until(lambda: set(last_update()) == {one, two}, 5, "two rows in update")
            shown = last_update()
            assert [(shown[k]["worker_id"], shown[k]["request_id"]) for k in (one, two)] == [
                ("w1", "dup"),
                ("w2", "dup"),
            ]
            polled = (await http.get("/metrics/active-requests")).json()["active_requests"]
            assert sorted(r["key"] for r in polled) == sorted([one, two])
            assert await _in_flight_gauge(http) == {"w1": 1.0, "w2": 1.0}

            n = len(deltas_.events)
            await w1.end("dup")  # one of them ends: exactly its key goes
            event = await deltas_.wait(
                lambda e: e.event == "delta" and orjson.loads(e.data)["remove"], 5, after=n
            )
            assert orjson.loads(event.data)["remove"] == [one]
            await wait_until(lambda: set(last_update()) == {two}, 5, "one row in update")
            assert set(DeltaState.replay(deltas_).rows) == {two}
            assert await _in_flight_gauge(http) == {"w2": 1.0}

            await w2.progress("dup", bytes_out=5)  # the one left still follows its worker
            await wait_until(
                lambda: DeltaState.replay(deltas_).rows[two]["bytes_out"] == 5, 5, "progress"
            )
            await w2.end("dup")
            await wait_until(lambda: not DeltaState.replay(deltas_).rows, 5, "no rows")
            await wait_until(lambda: not last_update(), 5, "no rows in update")
            assert await _in_flight_gauge(http) == {}
