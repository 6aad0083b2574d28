"""Other people's servers under ``vdm-hub instrument``, and the client side of their tests.

The programs come from PyPI into virtualenvs of their own (:class:`bench.peer.PeerVenv`,
cached between runs), with this checkout's ``vdm_hub`` on their ``PYTHONPATH``
(:func:`bench.peer.vdm_hub_on_path`): they run today's code as if ``pip install vdm-hub`` had
put it beside them. Each test drives them as a user would: a stream service on the same Redis,
streaming requests held open through the instrumented server, the view sampled while they are
in flight, a cancel from the stream service's API.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from bench.peer import InstallFailed, PeerVenv, vdm_hub_on_path
from tests.procs import VDM_HUB, Proc, vdm_hub
from vdm_hub.shared import schema
from vdm_hub.shared.children import Child
from vdm_hub.shared.keys import Keys

# A first install of LiteLLM's proxy is ~750 MB of wheels: minutes on a slow link.
INSTALL_TIMEOUT = 900.0
# A peer imports its whole framework in every process; two of them and their parent on a busy
# 2-core machine took up to 90 s (LiteLLM) in trials.
START_TIMEOUT = 240.0
SNAPSHOT = "/metrics/active-requests"
STARTED = "Application startup complete."
CANCEL_BOUND = 2.0  # seconds from the cancel to the client's stream ending (the contract)


def installed(venv: PeerVenv) -> PeerVenv:
    """``venv``, installed first when it is not in the cache; the test is skipped (with the
    reason) only when that needs the package index and the index cannot be reached."""
    try:
        venv.ensure_installed(INSTALL_TIMEOUT)
    except InstallFailed as exc:
        if exc.offline:
            pytest.skip(f"{venv.name} is not cached and the package index is unreachable: {exc}")
        raise
    return venv


def peer_env(home: Path, redis_url: str, key_prefix: str, **extra: str) -> dict[str, str]:
    """A peer's whole environment: nothing of the test runner's (pytest's variables change
    what some apps do), the hub's settings, and this checkout's ``vdm_hub`` importable."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "PYTHONPATH": str(vdm_hub_on_path(home / "pythonpath")),
        "REDIS_URL": redis_url,
        "VDM_KEY_PREFIX": key_prefix,
        "NO_COLOR": "1",
        **extra,
    }


class Instrumented(Child):
    """``vdm-hub instrument -- COMMAND...`` run from ``home``, every line of output kept."""

    def __init__(self, name: str, command: Sequence[str], env: Mapping[str, str], home: Path):
        super().__init__(name, [*VDM_HUB, "instrument", "--", *command], env, cwd=home, keep=None)


def stream_service(redis_url: str, key_prefix: str) -> Proc:
    return vdm_hub(
        "stream",
        "--port",
        "0",
        env={
            "REDIS_URL": redis_url,
            "VDM_KEY_PREFIX": key_prefix,
            "VDM_CANCEL_ENABLED": "true",
            "VDM_ACTIVE_REQUESTS_SSE_INTERVAL": "0.3",
        },
    )


async def until(
    check: Callable[[], Awaitable[Any]], timeout: float, what: str, server: Child | None = None
) -> Any:
    """``await check()`` until it is truthy; fail after ``timeout`` s, or at once when
    ``server`` exits, with its last output."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if server is not None and server.poll() is not None:
            raise AssertionError(
                f"{server.name} exited while waiting for {what}:\n{server.output[-4000:]}"
            )
        if time.monotonic() > deadline:
            tail = f"; {server.name} said:\n{server.output[-4000:]}" if server else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{tail}")
        await asyncio.sleep(0.1)


async def answers(client: httpx.AsyncClient, url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return (await client.get(url, timeout=5)).status_code == 200
    return False


async def _lines(server: Child, text: str, count: int) -> bool:
    return server.output.count(text) >= count


@dataclass
class View:
    """The stream service's JSON snapshot, as a dashboard's polling fallback reads it."""

    url: str
    client: httpx.AsyncClient

    async def snapshot(self) -> dict[str, Any]:
        answer = await self.client.get(self.url + SNAPSHOT, timeout=10)
        answer.raise_for_status()
        body: dict[str, Any] = answer.json()
        return body

    async def rows(self) -> dict[str, dict[str, Any]]:
        return {row["request_id"]: row for row in (await self.snapshot())["active_requests"]}

    async def workers_up(self, count: int, server: Child) -> list[dict[str, Any]]:
        """Once exactly ``count`` workers are up and every one accepts connections."""
        # Uvicorn (also inside gunicorn) logs this line in each worker once the app's startup
        # is over and it accepts connections; the publisher registers earlier, on the
        # lifespan's start, while a slow app (LiteLLM) may take seconds more to get there.
        await until(lambda: _lines(server, STARTED, count), START_TIMEOUT, STARTED, server)

        async def up() -> list[dict[str, Any]] | None:
            workers = [w for w in (await self.snapshot())["workers"] if w["status"] == "up"]
            return workers if len(workers) >= count else None

        workers: list[dict[str, Any]] = await until(up, START_TIMEOUT, f"{count} workers", server)
        assert len(workers) == count, workers
        return workers


async def every_worker_answers(
    client: httpx.AsyncClient,
    url: str,
    redis: aioredis.Redis,
    key_prefix: str,
    workers: set[str],
    server: Child,
    headers: Mapping[str, str] | None = None,
    body: dict[str, Any] | None = None,
) -> None:
    """GET ``url`` (POST ``body``, if given) on a new connection each time until every one of
    ``workers`` has answered one (its completed entry says so): a worker can be up and still
    busy finishing its own start-up (LiteLLM's runs on for seconds), and while it is, every
    connection lands on the other one. ``url`` must be a path the hub reports (health probes
    are left out)."""
    seen: set[str] = set()
    deadline = time.monotonic() + START_TIMEOUT
    for i in itertools.count():
        request_id = f"probe-{i}"
        answer = await client.request(
            "GET" if body is None else "POST",
            url,
            json=body,
            headers={"x-request-id": request_id, "connection": "close", **(headers or {})},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text[:300]
        seen.add((await completed(redis, key_prefix, request_id))["worker_id"])
        if seen >= workers:
            return
        if time.monotonic() > deadline or server.poll() is not None:
            raise AssertionError(f"only {seen} of {workers} answered {i + 1} requests")
        await asyncio.sleep(0.1)


@dataclass
class Held:
    """One streaming request held open through the server under test."""

    request_id: str
    model: str
    events: list[str] = field(default_factory=list)  # SSE event names, or "data" lines
    ended_at: float | None = None  # monotonic, when the stream ended (cleanly or not)
    error: str = ""
    task: asyncio.Task[None] | None = None

    def done(self) -> bool:
        return self.ended_at is not None


async def hold(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    held: Held,
    headers: Mapping[str, str],
) -> None:
    """Read ``held``'s stream to its end, noting each event and when it ended."""
    try:
        async with client.stream(
            "POST",
            url,
            content=orjson.dumps(body),
            headers={
                "content-type": "application/json",
                "x-request-id": held.request_id,
                **headers,
            },
        ) as response:
            if response.status_code != 200:
                held.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    held.events.append(line[7:])
                elif line.startswith("data: "):
                    held.events.append("[DONE]" if line == "data: [DONE]" else "data")
    except httpx.HTTPError as exc:  # a cut stream: what a cancel must look like to the client
        held.error = f"{type(exc).__name__}: {exc}"
    finally:
        held.ended_at = time.monotonic()


class Holds:
    """Streaming requests held open through one server, each on a connection of its own."""

    def __init__(self, client: httpx.AsyncClient, url: str, headers: Mapping[str, str]) -> None:
        self.client = client
        self.url = url
        self.headers = headers
        self.streams: list[Held] = []

    def start(self, request_id: str, body: dict[str, Any]) -> Held:
        held = Held(request_id, body["model"])
        held.task = asyncio.create_task(hold(self.client, self.url, body, held, self.headers))
        self.streams.append(held)
        return held

    async def on_every_worker(
        self,
        view: View,
        bodies: Iterator[tuple[str, dict[str, Any]]],
        *,
        at_least: int,
        workers: int,
        server: Child,
    ) -> dict[str, dict[str, Any]]:
        """Start streams one at a time until ``at_least`` are held and ``workers`` processes
        hold some; their rows once every one of them streams.

        One at a time, because the kernel hands a burst of connections to whichever worker
        accepts first (asyncio accepts a whole backlog at once): spaced out, each new one has
        a fair chance to land on another process. Bounded: ``4 * at_least`` streams at most.
        """
        owners: set[str] = set()
        while len(self.streams) < at_least or len(owners) < workers:
            assert len(self.streams) < 4 * at_least, (
                f"all {len(self.streams)} held streams landed on {owners}"
            )
            self.start(*next(bodies))
            await asyncio.sleep(0.2)
            rows = await view.rows()
            owners = {rows[h.request_id]["worker_id"] for h in self.streams if h.request_id in rows}
        streaming: dict[str, dict[str, Any]] = await until(
            lambda: self._all_streaming(view), 60, "every held row", server
        )
        assert len({row["worker_id"] for row in streaming.values()}) == workers, streaming
        return streaming

    async def first_tokens(self, view: View, server: Child) -> dict[str, dict[str, Any]]:
        """The held rows once every one of them has its time to first token."""
        rows: dict[str, dict[str, Any]] = await until(
            lambda: self._all_streaming(view, "ttft_ms"), 60, "every held row's TTFT", server
        )
        return rows

    async def _all_streaming(
        self, view: View, known: str = "phase"
    ) -> dict[str, dict[str, Any]] | None:
        """The held rows when all are streaming (``known``: a field that must be set, too)."""
        failed = [(h.request_id, h.error) for h in self.streams if h.error]
        assert not failed, failed
        rows = await view.rows()
        mine = {h.request_id: rows.get(h.request_id) for h in self.streams}
        if all(
            row is not None and row["phase"] == "streaming" and row.get(known) is not None
            for row in mine.values()
        ):
            return {rid: row for rid, row in mine.items() if row is not None}
        return None


@contextlib.asynccontextmanager
async def holding(url: str, headers: Mapping[str, str] | None = None) -> AsyncIterator[Holds]:
    """A :class:`Holds` on ``url``; every stream still open on the way out is closed by the
    client (its row ends as ``client_closed``)."""
    limits = httpx.Limits(max_keepalive_connections=0)  # a new connection for every stream
    async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as client:
        holds = Holds(client, url, headers or {})
        try:
            yield holds
        finally:
            tasks = [h.task for h in holds.streams if h.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def all_rows_in_every_sample(view: View, held: Sequence[Held], samples: int) -> set[str]:
    """Sample the view ``samples`` times; every sample must hold every held request (none of
    them has ended). Returns the worker ids that hold them."""
    wanted = {h.request_id for h in held}
    owners: set[str] = set()
    for i in range(samples):
        rows = await view.rows()
        missing = wanted - rows.keys()
        assert not missing, f"sample {i}: {len(missing)} of {len(wanted)} held rows missing"
        assert not any(h.done() for h in held), [h for h in held if h.done()]
        owners |= {rows[rid]["worker_id"] for rid in wanted}
        await asyncio.sleep(0.05)
    return owners


async def cancel_cuts_the_client(view: View, held: Held, worker_id: str) -> float:
    """Cancel ``held`` through the stream service; the seconds until its client's stream ended.
    The stream must end cut off, not with the protocol's clean finish."""
    started = time.monotonic()
    answer = await view.client.post(
        f"{view.url}{SNAPSHOT}/{held.request_id}/cancel", params={"worker_id": worker_id}
    )
    assert answer.status_code == 202, answer.text
    await until(lambda: _done(held), 10, f"the cancelled stream {held.request_id} to end")
    assert held.ended_at is not None
    return held.ended_at - started


async def _done(held: Held) -> bool:
    return held.done()


async def completed(
    redis: aioredis.Redis, key_prefix: str, request_id: str, timeout: float = 10.0
) -> dict[str, Any]:
    """The finished entry of ``request_id`` in the completed stream (waits for it)."""

    async def find() -> dict[str, Any] | None:
        entries: Any = await redis.xrevrange(Keys(key_prefix).completed, count=500)
        for entry_id, fields in entries:
            entry = schema.decode_completed(entry_id, fields)
            if entry["request_id"] == request_id:
                return dict(entry)
        return None

    entry: dict[str, Any] = await until(find, timeout, f"the completed entry of {request_id}")
    return entry
