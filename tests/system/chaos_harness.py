"""A small fleet of real processes for the chaos suite, and the tools to fault it.

- :class:`Fleet`: a dedicated Redis, N ``vdm-hub worker`` processes (short heartbeat and TTL)
  and one ``vdm-hub stream``; workers and the stream restart on the ports they had, so the
  load generator's targets and the SSE clients' URL stay valid.
- :func:`wait_views_match`: the stream's rows equal the load generator's in-flight set.
- :class:`RedisLink`: a TCP proxy between one worker and Redis that can cut the network
  (existing connections closed, new ones black-holed) and restore it, or freeze the open
  connections (a half-open link: nothing gets through, nothing is closed).
- :class:`SSEWatcher`: an SSE client that reconnects, like the browser client does.

Blocking waits (process start-up) run in a thread, so the load generator sharing the test's
event loop keeps reading its responses meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis
from httpx_sse import aconnect_sse

from tests.procs import Proc, vdm_hub
from vdm_hub.services.demo.load import LoadGenerator
from vdm_hub.shared.embedded_redis import EmbeddedRedis
from vdm_hub.shared.keys import Keys

HEARTBEAT_S = 0.5
TTL_S = 2.0
SSE_INTERVAL_S = 0.5
STREAM_PATH = "/metrics/active-requests/stream"


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


@dataclass
class Worker:
    worker_id: str
    redis_url: str
    proc: Proc | None = None
    url: str = ""

    @property
    def port(self) -> int:
        return _port(self.url)


@dataclass
class Fleet:
    """Processes sharing one dedicated Redis and one key prefix."""

    redis: EmbeddedRedis
    prefix: str
    upstream_url: str
    workers: list[Worker] = field(default_factory=list)
    stream: Proc | None = None
    stream_url: str = ""
    ttl: float = TTL_S
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. VDM_REDIS_MODE

    def env(self, redis_url: str | None = None, **extra: str) -> dict[str, str]:
        return {
            **self.extra_env,
            "REDIS_URL": redis_url or self.redis.url,
            "VDM_KEY_PREFIX": self.prefix,
            "VDM_WORKER_HEARTBEAT_INTERVAL": str(HEARTBEAT_S),
            "VDM_WORKER_TTL": str(self.ttl),
            "VDM_ACTIVE_REQUESTS_SSE_INTERVAL": str(SSE_INTERVAL_S),
            **extra,
        }

    def _spawn_worker(self, worker: Worker, port: int = 0) -> None:
        worker.proc = vdm_hub(
            "worker",
            "--upstream",
            self.upstream_url,
            "--port",
            str(port),
            env=self.env(worker.redis_url, VDM_WORKER_ID=worker.worker_id),
        )

    async def start(self, n_workers: int, redis_urls: dict[int, str] | None = None) -> None:
        """Start ``n_workers`` workers and the stream, all at once, and wait for them."""
        for i in range(n_workers):
            url = (redis_urls or {}).get(i, self.redis.url)
            # A hash-tagged prefix ({fleet}) keeps its name, not its braces, in worker ids.
            base = self.prefix.replace("{", "").replace("}", "")
            worker = Worker(worker_id=f"{base}-w{i}", redis_url=url)
            self._spawn_worker(worker)
            self.workers.append(worker)
        self.stream = vdm_hub("stream", "--port", "0", env=self.env())
        for worker in self.workers:
            assert worker.proc is not None
            worker.url = await asyncio.to_thread(worker.proc.wait_ready, 30)
        self.stream_url = await asyncio.to_thread(self.stream.wait_ready, 30)

    async def restart_worker(self, worker: Worker, *, kill: bool) -> None:
        """Same id, same port; SIGKILL (``kill``) or SIGTERM first."""
        assert worker.proc is not None
        if kill:
            worker.proc.kill()
        else:
            await asyncio.to_thread(worker.proc.stop)
        self._spawn_worker(worker, worker.port)
        assert worker.proc is not None
        await asyncio.to_thread(worker.proc.wait_ready, 30)

    async def restart_stream(self) -> None:
        assert self.stream is not None
        port = _port(self.stream_url)
        await asyncio.to_thread(self.stream.stop)
        self.stream = vdm_hub("stream", "--port", str(port), env=self.env())
        await asyncio.to_thread(self.stream.wait_ready, 30)

    def stop(self) -> None:
        for proc in [w.proc for w in self.workers] + [self.stream]:
            if proc is not None:
                proc.stop(timeout=5)


@contextlib.asynccontextmanager
async def fleet(
    upstream_url: str,
    prefix: str,
    n_workers: int = 3,
    redis_urls: dict[int, str] | None = None,
    redis: EmbeddedRedis | None = None,
    ttl: float = TTL_S,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Fleet]:
    own = redis is None
    server = redis or EmbeddedRedis().start()
    f = Fleet(redis=server, prefix=prefix, upstream_url=upstream_url, ttl=ttl, extra_env=env or {})
    try:
        await f.start(n_workers, redis_urls)
        yield f
    finally:
        await asyncio.to_thread(f.stop)
        if own:
            server.stop()


def load(targets: list[str], *, concurrency: int = 12, rate: float = 15.0) -> LoadGenerator:
    """Requests held 0.5-2 s upstream, so many are in flight at any moment. The rate bounds
    the spin when a target is down (a refused connection fails at once)."""
    return LoadGenerator(
        targets,
        concurrency=concurrency,
        rate=rate,
        hold=(0.5, 2.0),
        stream_share=0.5,
        shape="mixed",
        timeout=30.0,
        seed=7,
    )


def target_of(gen: LoadGenerator, request_id: str) -> str:
    """The target a request went to: the generator picks targets round robin by number."""
    return gen.targets[(request_number(request_id) - 1) % len(gen.targets)]


async def finish_load(gen: LoadGenerator, timeout: float = 15.0) -> None:
    """Send nothing new and let what is in flight finish (not cancel it)."""
    gen.requests = gen.stats.sent  # the dispatcher sees it at the next finish or tick
    async with asyncio.timeout(timeout):
        await gen.wait()


# --------------------------------------------------------------------------- views


async def stream_rows(client: httpx.AsyncClient, stream_url: str) -> list[dict[str, Any]] | None:
    """The stream's rows, or None while it cannot answer (restarting)."""
    try:
        response = await client.get(f"{stream_url}/metrics/active-requests", timeout=2.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    rows: list[dict[str, Any]] = orjson.loads(response.content)["active_requests"]
    return rows


async def snapshot(client: httpx.AsyncClient, stream_url: str) -> dict[str, Any] | None:
    """The stream's whole JSON snapshot, or None while it cannot answer."""
    try:
        response = await client.get(f"{stream_url}/metrics/active-requests", timeout=2.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    snap: dict[str, Any] = orjson.loads(response.content)
    return snap


async def wait_sync(
    client: httpx.AsyncClient, stream_url: str, state: str, *, timeout: float, since: float
) -> tuple[float, dict[str, Any]]:
    """Poll until the snapshot's ``sync`` is ``state``; returns (seconds from ``since``, that
    snapshot)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = await snapshot(client, stream_url)
        if snap is not None and snap.get("sync") == state:
            return time.monotonic() - since, snap
        if time.monotonic() >= deadline:
            raise AssertionError(f"sync never became {state!r} within {timeout}s: {snap}")
        await asyncio.sleep(0.05)


def request_number(request_id: str) -> int:
    return int(request_id.rsplit("-", 1)[1])


async def views_match_once(
    gen: LoadGenerator, client: httpx.AsyncClient, stream_url: str, newer_than: int = 0
) -> bool:
    """True when the generator's in-flight set, read before and after the snapshot, equals
    the snapshot's request ids: then the three were equal at one moment (the snapshot's).
    With ``newer_than``, the snapshot must also hold a request sent after that number: a
    view frozen before a fault can equal the truth for a moment, a live one shows new rows."""
    before = set(gen.in_flight)
    rows = await stream_rows(client, stream_url)
    after = set(gen.in_flight)
    if rows is None:
        return False
    ids = {r["request_id"] for r in rows}
    if newer_than and not any(request_number(rid) > newer_than for rid in ids):
        return False
    return before == after == ids


async def wait_views_match(
    gen: LoadGenerator,
    client: httpx.AsyncClient,
    stream_url: str,
    *,
    since: float,
    timeout: float = 20.0,
    what: str = "",
    fresh: bool = False,
) -> float:
    """Poll until the views match; returns seconds from ``since`` (monotonic) to the match.
    ``fresh``: only a match that shows a request sent after this call counts (see above)."""
    deadline = time.monotonic() + timeout
    newer_than = gen.stats.sent if fresh else 0
    last: tuple[set[str], set[str]] = (set(), set())
    while True:
        if await views_match_once(gen, client, stream_url, newer_than):
            return time.monotonic() - since
        if time.monotonic() >= deadline:
            rows = await stream_rows(client, stream_url) or []
            last = (set(gen.in_flight), {r["request_id"] for r in rows})
            raise AssertionError(
                f"{what}: the stream's view never matched the true in-flight set within "
                f"{timeout}s; missing {sorted(last[0] - last[1])[:10]}, "
                f"ghosts {sorted(last[1] - last[0])[:10]}"
            )
        await asyncio.sleep(0.05)


async def wait_drained(client: httpx.AsyncClient, stream_url: str, timeout: float = 10.0) -> float:
    """After the load has finished: the stream shows no row at all (no ghost survived)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        rows = await stream_rows(client, stream_url)
        if rows == []:
            return time.monotonic() - t0
        if time.monotonic() >= deadline:
            raise AssertionError(f"ghost rows after the load ended: {rows}")
        await asyncio.sleep(0.05)


async def finished_lost(gen: LoadGenerator, redis_url: str, prefix: str) -> int:
    """After the load drained: how many of the generator's requests are missing from
    ``P:completed`` (every one it sent finished; the stream is far below its cap here)."""
    sent = {f"{gen.run_id}-{n}" for n in range(1, gen.stats.sent + 1)}
    client = aioredis.Redis.from_url(redis_url)
    try:
        entries: Any = await client.xrange(Keys(prefix).completed)
    finally:
        await client.aclose()
    recorded = {fields[b"request_id"].decode() for _id, fields in entries}
    return len(sent - recorded)


def report(fault: str, seconds: float, detail: str = "") -> None:
    print(f"[chaos] {fault}: views matched {seconds:.2f}s after the fault ended {detail}".rstrip())


# --------------------------------------------------------------------------- network cut


class RedisLink:
    """A TCP proxy to Redis that can be cut (connections closed, new ones black-holed: the
    client sees timeouts, as with a real partition) and restored."""

    def __init__(self, redis_host: str, redis_port: int) -> None:
        self.target = (redis_host, redis_port)
        self.is_cut = False
        self._frozen: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.url = ""

    async def __aenter__(self) -> RedisLink:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"redis://127.0.0.1:{port}/0"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self._close_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _close_all(self) -> None:
        for writer in list(self._conns):
            writer.close()
        self._conns.clear()
        self._frozen.clear()

    def cut(self) -> None:
        self.is_cut = True
        self._close_all()

    def freeze(self) -> None:
        """The open connections go silent both ways but stay open, as when the peer vanished
        without a FIN or RST; connections opened later work normally."""
        self._frozen |= self._conns

    def restore(self) -> None:
        self._close_all()  # black-holed connections are dead: clients reconnect
        self.is_cut = False

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        if self.is_cut:
            self._spawn(self._pump(reader, None))  # read and drop: a black hole
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._conns.add(up_writer)
        self._spawn(self._pump(reader, up_writer))
        self._spawn(self._pump(up_reader, writer))

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if writer is None or self.is_cut or writer in self._frozen:
                    continue
                writer.write(chunk)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if writer is not None:
                writer.close()
                self._conns.discard(writer)


# --------------------------------------------------------------------------- SSE clients


class SSEWatcher:
    """Follows the stream like the browser client: on any end or error, reconnect."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connects = 0
        self.rows: set[str] = set()
        self.updates = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        timeout = httpx.Timeout(5.0, read=5.0)
        async with httpx.AsyncClient(timeout=timeout) as client:
            while True:
                try:
                    async with aconnect_sse(client, "GET", self.url + STREAM_PATH) as source:
                        if source.response.status_code == 200:
                            self.connects += 1
                            async for event in source.aiter_sse():
                                if event.event == "update":
                                    data = orjson.loads(event.data)
                                    self.rows = {r["request_id"] for r in data["active_requests"]}
                                    self.updates += 1
                except (httpx.HTTPError, OSError, ValueError):
                    pass
                await asyncio.sleep(0.25)


async def wait_sse_matches(
    gen: LoadGenerator, watcher: SSEWatcher, timeout: float = 20.0, since_update: int = 0
) -> None:
    """The client's latest ``update`` (one newer than ``since_update``) equals the true set.
    All three reads happen without an await between them, so at one moment."""
    deadline = time.monotonic() + timeout
    while True:
        before = set(gen.in_flight)
        seen = set(watcher.rows)
        if watcher.updates > since_update and before == seen == set(gen.in_flight):
            return
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"SSE client's view never matched: missing {sorted(before - seen)[:10]}, "
                f"ghosts {sorted(seen - before)[:10]}"
            )
        await asyncio.sleep(0.05)
