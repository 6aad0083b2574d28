"""The load generator against the demo upstream on a real socket: bounds, exact in-flight set,
stop(), failures, round robin, shapes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.serving import running
from vdm_hub.services.demo import load
from vdm_hub.services.demo.load import LoadGenerator, Shape, parse_hold
from vdm_hub.services.demo.loadstats import Progress, Reservoir
from vdm_hub.services.demo.upstream import create_app
from vdm_hub.shared import fdlimit
from vdm_hub.shared.serve import bind_socket, url_for


@dataclass
class Recorder:
    """ASGI wrapper that sees what the server sees: ids in progress, paths, peak concurrency."""

    app: Any
    active: set[str] = field(default_factory=set)
    seen: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    peak: int = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # the lifespan: the app's own business
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        request_id = headers.get(b"x-request-id", b"").decode()
        self.seen.append(request_id)
        self.paths.append(scope["path"])
        self.active.add(request_id)
        self.peak = max(self.peak, len(self.active))
        try:
            await self.app(scope, receive, send)
        finally:
            self.active.discard(request_id)


async def until(condition: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, Recorder]]:
    recorder = Recorder(create_app(latency=0, chunk_delay=0, chunks=4))
    async with running(recorder, "upstream") as (url, _):
        yield url, recorder


async def test_sends_exactly_n_requests_within_the_concurrency_cap(
    upstream: tuple[str, Recorder],
) -> None:
    url, server = upstream
    async with LoadGenerator([url], requests=12, concurrency=3, hold=0.1, run_id="cap") as gen:
        stats = await asyncio.wait_for(gen.run(), 20)
    assert (stats.sent, stats.ok, stats.failed_total, stats.cancelled) == (12, 12, 0, 0)
    assert sorted(server.seen) == sorted(f"cap-{n}" for n in range(1, 13))
    assert server.peak <= 3
    assert gen.in_flight == set()
    assert stats.latency.percentile(50) is not None


async def test_in_flight_is_exactly_what_the_server_holds_and_stop_cancels_it(
    upstream: tuple[str, Recorder],
) -> None:
    url, server = upstream
    # No count or duration bound: only stop() ends this run.
    async with LoadGenerator([url], concurrency=5, hold=30, run_id="held") as gen:
        gen.start()
        await until(lambda: len(server.active) == 5, what="5 requests held by the server")
        assert gen.in_flight == server.active == {f"held-{n}" for n in range(1, 6)}
        stats = await asyncio.wait_for(gen.stop(), 5)
        assert gen.in_flight == set()
    assert (stats.sent, stats.ok, stats.failed_total, stats.cancelled) == (5, 0, 0, 5)
    # The upstream notices the disconnects and lets go of the held requests at once.
    await until(lambda: not server.active, timeout=5, what="the upstream to release its holds")


async def test_every_request_in_flight_is_at_the_server_beyond_httpx_default_pool(
    upstream: tuple[str, Recorder],
) -> None:
    # httpx's default pool holds 100 connections: the 50 beyond it would queue in this process
    # while counted as in flight, and the generator would report concurrency it never had.
    url, server = upstream
    async with LoadGenerator([url], concurrency=150, hold=30, run_id="wide") as gen:
        gen.start()
        await until(lambda: len(server.active) == 150, timeout=20, what="150 held at the server")
        assert gen.in_flight == server.active
        assert gen.waiting == set()
        assert gen.progress().waiting == 0
        await asyncio.wait_for(gen.stop(), 10)
    assert gen.stats.max_waiting <= 150
    assert gen.stats.send_wait.count == 150


async def test_requests_queued_in_the_client_are_reported_as_waiting(
    upstream: tuple[str, Recorder],
) -> None:
    # A transport with a 2-connection pool: 3 of 5 requests wait here, not at the server.
    url, server = upstream
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=2))
    async with LoadGenerator([url], concurrency=5, hold=30, run_id="q", transport=transport) as gen:
        gen.start()
        await until(lambda: len(gen.in_flight) == 5 and len(server.active) == 2, what="2 + 3")
        assert gen.waiting == gen.in_flight - server.active
        assert len(gen.waiting) == 3
        assert "waiting=3" in gen.progress().line()
        stats = await asyncio.wait_for(gen.stop(), 10)
    assert gen.waiting == set()
    assert stats.max_waiting >= 3
    assert "queued_here: p50=" in stats.summary_line()


def test_fd_budget_raises_the_soft_limit_to_the_hard_one(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = {"now": (256, 4096)}
    monkeypatch.setattr(fdlimit.resource, "getrlimit", lambda _: limits["now"])

    def setrlimit(_: int, value: tuple[int, int]) -> None:
        limits["now"] = value

    monkeypatch.setattr(fdlimit.resource, "setrlimit", setrlimit)
    assert load.fd_budget() == 4096 - fdlimit.FD_RESERVE
    assert limits["now"] == (4096, 4096)


async def test_in_flight_drops_ids_as_responses_complete(upstream: tuple[str, Recorder]) -> None:
    url, _ = upstream
    async with LoadGenerator([url], requests=4, concurrency=4, hold=(0.2, 0.2)) as gen:
        task = gen.start()
        await until(lambda: len(gen.in_flight) == 4, what="4 in flight")
        stats = await asyncio.wait_for(task, 10)
    assert gen.in_flight == set()
    assert stats.ok == 4


async def test_rate_limit_and_duration_bound_the_run(upstream: tuple[str, Recorder]) -> None:
    url, _ = upstream
    async with LoadGenerator([url], rate=20, duration=1.0, concurrency=10) as gen:
        started = time.monotonic()
        stats = await asyncio.wait_for(gen.run(), 10)
    # 20/s for 1 s is ~20 requests; unlimited would be hundreds.
    assert 5 <= stats.sent <= 22
    assert stats.ok == stats.sent
    assert time.monotonic() - started < 5


async def test_targets_are_used_round_robin(upstream: tuple[str, Recorder]) -> None:
    url, first = upstream
    second = Recorder(create_app(latency=0, chunk_delay=0))
    async with (
        running(second, "upstream") as (url2, _),
        LoadGenerator([url, url2], requests=6) as gen,
    ):
        stats = await asyncio.wait_for(gen.run(), 10)
    assert stats.ok == 6
    assert (len(first.seen), len(second.seen)) == (3, 3)


@pytest.mark.parametrize(
    ("shape", "paths"),
    [
        (Shape.OPENAI, {"/v1/chat/completions"}),
        (Shape.ANTHROPIC, {"/v1/messages"}),
        (Shape.MIXED, {"/v1/chat/completions", "/v1/messages"}),
    ],
)
async def test_shape_picks_the_vendor_endpoints(
    upstream: tuple[str, Recorder], shape: Shape, paths: set[str]
) -> None:
    url, server = upstream
    async with LoadGenerator([url], requests=4, shape=shape, stream_share=0.5, seed=1) as gen:
        stats = await asyncio.wait_for(gen.run(), 10)
    assert stats.ok == 4
    assert set(server.paths) == paths


async def test_http_errors_and_refused_connections_count_as_failures() -> None:
    async with (
        running(create_app(latency=0, error_rate=1.0), "upstream") as (url, _),
        LoadGenerator([url], requests=3) as gen,
    ):
        stats = await asyncio.wait_for(gen.run(), 10)
    assert stats.ok == 0 and dict(stats.failed) == {"http_500": 3}

    sock = bind_socket("127.0.0.1", 0)  # a port nobody listens on (bound, never accepting)
    dead = url_for(sock)
    sock.close()
    async with LoadGenerator([dead], requests=2, timeout=2) as gen:
        stats = await asyncio.wait_for(gen.run(), 10)
    assert dict(stats.failed) == {"connect": 2}
    assert gen.in_flight == set()


async def test_progress_hook_sees_the_run(upstream: tuple[str, Recorder]) -> None:
    url, _ = upstream
    seen: list[Progress] = []
    async with LoadGenerator(
        [url], duration=0.5, rate=40, on_progress=seen.append, progress_interval=0.1
    ) as gen:
        await asyncio.wait_for(gen.run(), 10)
    assert seen
    assert seen[-1].sent >= seen[0].sent > 0
    assert "sent=" in seen[-1].line() and "in_flight=" in seen[-1].line()


def test_parse_hold() -> None:
    assert parse_hold(None) is None
    assert parse_hold("1.5") == (1.5, 1.5)
    assert parse_hold("0.5-2") == (0.5, 2.0)
    assert parse_hold(3) == (3.0, 3.0)
    for bad in ("2-1", "x", "-1", "0-601"):
        with pytest.raises(ValueError):
            parse_hold(bad)


def test_generator_rejects_bad_bounds() -> None:
    for kwargs in ({"concurrency": 0}, {"rate": -1}, {"stream_share": 2}, {"requests": -1}):
        with pytest.raises(ValueError):
            LoadGenerator(["http://127.0.0.1:1"], **kwargs)
    with pytest.raises(ValueError):
        LoadGenerator([])


def test_reservoir_percentiles_are_exact_while_it_holds_every_value() -> None:
    r = Reservoir(size=1000)
    assert r.percentile(50) is None
    for v in range(1, 101):
        r.add(float(v))
    assert (r.percentile(50), r.percentile(95), r.percentile(99), r.percentile(100)) == (
        50.0,
        95.0,
        99.0,
        100.0,
    )


def test_reservoir_memory_is_bounded() -> None:
    r = Reservoir(size=10)
    for v in range(1000):
        r.add(float(v))
    assert r.count == 1000
    assert len(r._values) == 10
