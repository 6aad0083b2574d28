"""Helpers for the stream service's tests: fake workers speaking wire protocol v1 through the
real Lua scripts, an in-loop Uvicorn server, and an SSE reader built on httpx-sse."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis
from httpx_sse import ServerSentEvent, aconnect_sse
from redis.exceptions import RedisError

from tests.serving import running
from vdm_hub.services.stream.app import create_app
from vdm_hub.services.stream.table import row_key
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.settings import Settings
from vdm_hub.shared.store import WireScripts

FAST = {
    "VDM_ACTIVE_REQUESTS_SSE_INTERVAL": "0.3",
    "VDM_ACTIVE_REQUESTS_SSE_HEARTBEAT": "0.2",
    "VDM_WORKER_TTL": "1.5",
    "VDM_WORKER_HEARTBEAT_INTERVAL": "0.3",
}


def settings_for(redis_url: str, key_prefix: str, **extra: str) -> Settings:
    return Settings.from_env(
        {"REDIS_URL": redis_url, "VDM_KEY_PREFIX": key_prefix, **FAST, **extra}
    )


def make_row(worker_id: str, request_id: str, model: str = "m", age: float = 0.0) -> schema.Row:
    return schema.Row(
        request_id=request_id,
        worker_id=worker_id,
        method="POST",
        path="/v1/chat/completions",
        model=model,
        provider="openai",
        is_streaming=False,
        start_time=time.time() - age,
        phase="upstream",
        bytes_out=0,
        input_tokens=None,
        output_tokens=None,
        ttft_ms=None,
        chunks_out=None,
    )


class FakeWorker:
    """A worker reduced to its wire protocol: register, start/end requests, heartbeat."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        worker_id: str,
        *,
        ttl: float = 30.0,
        heartbeat_interval: float = 5.0,
        cancellable: bool | None = None,
    ) -> None:
        self.scripts = WireScripts(redis, keys)
        self.worker_id = worker_id
        self.cancellable = cancellable  # None: a record without the field (an older worker)
        self.ttl = ttl
        self.heartbeat_interval = heartbeat_interval
        self.epoch = ""
        self.rows: dict[str, schema.Row] = {}

    def record(self) -> schema.WorkerRecord:
        record = schema.WorkerRecord(
            worker_id=self.worker_id,
            host="fakehost",
            pid=4242,
            started_at=time.time(),
            upstream="http://upstream",
            version="test",
            epoch=self.epoch,
            heartbeat_interval=self.heartbeat_interval,
            ttl=self.ttl,
        )
        if self.cancellable is not None:
            record["cancellable"] = self.cancellable
        return record

    async def register(self) -> None:
        self.epoch = uuid.uuid4().hex[:12]
        rows = [(rid, schema.encode_row(row)) for rid, row in self.rows.items()]
        await self.scripts.register(self.record(), rows, ttl_ms=int(self.ttl * 1000))

    async def reregister_with(self, *request_ids: str, timeout: float = 10.0) -> None:
        """What a worker does after losing Redis: a new epoch carrying its whole active set."""
        for rid in request_ids:
            self.rows[rid] = make_row(self.worker_id, rid)
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.register()
                return
            except (RedisError, OSError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def heartbeat(self) -> bool:
        return await self.scripts.heartbeat(self.worker_id, self.epoch, ttl_ms=int(self.ttl * 1000))

    async def _apply(
        self,
        events: list[dict[str, Any]],
        sets: list[tuple[str, bytes]],
        deletes: list[str],
        completed: list[schema.CompletedEntry],
    ) -> int:
        prefix = schema.envelope_prefix(self.worker_id, self.epoch)
        return await self.scripts.apply(
            self.worker_id,
            self.epoch,
            prefix,
            schema.encode(events),
            sets,
            deletes,
            completed,
            1000,
            int(self.ttl * 1000),
        )

    async def start(self, *request_ids: str, model: str = "m") -> int:
        rows = [make_row(self.worker_id, rid, model) for rid in request_ids]
        for row in rows:
            self.rows[row["request_id"]] = row
        return await self._apply(
            [{"type": "start", "row": r} for r in rows],
            [(r["request_id"], schema.encode_row(r)) for r in rows],
            [],
            [],
        )

    async def progress(self, request_id: str, **fields: Any) -> int:
        """A ``progress`` event: the row changes, the number of rows does not."""
        row = self.rows[request_id]
        row.update(fields)  # type: ignore[typeddict-item]
        return await self._apply(
            [{"type": "progress", "request_id": request_id, **fields}],
            [(request_id, schema.encode_row(row))],
            [],
            [],
        )

    async def end(self, *request_ids: str, outcome: str = "ok", duration_ms: float = 120.0) -> int:
        events: list[dict[str, Any]] = []
        done: list[schema.CompletedEntry] = []
        for rid in request_ids:
            row = self.rows.pop(rid)
            events.append(
                {
                    "type": "end",
                    "request_id": rid,
                    "status": 200 if outcome == "ok" else 500,
                    "outcome": outcome,
                    "duration_ms": duration_ms,
                    "input_tokens": 3,
                    "output_tokens": 5,
                }
            )
            done.append(
                schema.CompletedEntry(
                    request_id=rid,
                    worker_id=self.worker_id,
                    model=row["model"],
                    method=row["method"],
                    path=row["path"],
                    status=200 if outcome == "ok" else 500,
                    outcome=outcome,
                    start_time=time.time() - duration_ms / 1000,
                    duration_ms=duration_ms,
                    input_tokens=3,
                    output_tokens=5,
                    bytes_out=10,
                )
            )
        return await self._apply(events, [], list(request_ids), done)

    async def remove(self) -> int:
        return await self.scripts.remove(self.worker_id, reason="shutdown", epoch=self.epoch)


@contextlib.asynccontextmanager
async def running_stream(
    settings: Settings, redis: aioredis.Redis | None = None
) -> AsyncIterator[tuple[str, Any]]:
    """A real Uvicorn server with the stream app on a free port in this loop: (url, app)."""
    app = create_app(settings, redis)
    async with running(app, "stream") as (url, _server):
        try:
            yield url, app
        finally:
            # What the stream command's on_exit does: open streams end before Uvicorn waits.
            app.state.broadcaster.close()


async def wait_until(
    condition: Callable[[], Any], timeout: float, message: str = "condition"
) -> Any:
    """Async poll with a deadline (tests/procs.wait_for for coroutines' sake)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.02)


async def wait_ready(url: str, timeout: float = 10.0) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=2) as client:

        async def ready() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await wait_until(ready, timeout, f"{url}/readyz to answer 200")


class SSEReader:
    """Reads one SSE stream in a background task; tests await events matching a predicate."""

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.url = url
        self.headers = headers or {}
        self.events: list[tuple[float, ServerSentEvent]] = []
        self.response: httpx.Response | None = None
        self.ended = False
        self._client = client
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SSEReader:
        self._task = asyncio.create_task(self._run())
        await self.wait(lambda e: True, 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        own = self._client is None
        client = self._client or httpx.AsyncClient(timeout=httpx.Timeout(10, read=30))
        try:
            async with aconnect_sse(client, "GET", self.url, headers=self.headers) as source:
                self.response = source.response
                async for event in source.aiter_sse():
                    async with self._changed:
                        self.events.append((time.monotonic(), event))
                        self._changed.notify_all()
        finally:
            self.ended = True
            async with self._changed:
                self._changed.notify_all()
            if own:
                await client.aclose()

    def updates(self) -> list[dict[str, Any]]:
        return [orjson.loads(e.data) for _, e in self.events if e.event == "update"]

    async def wait(
        self, predicate: Callable[[ServerSentEvent], bool], timeout: float, after: int = 0
    ) -> ServerSentEvent:
        """The first event at index >= ``after`` that matches."""
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for _, event in self.events[after:]:
                    if predicate(event):
                        return event
                if self.ended:
                    raise EOFError(f"stream ended without a matching event: {self.events[-3:]}")
                await self._changed.wait()

    async def wait_update(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> dict[str, Any]:
        event = await self.wait(
            lambda e: e.event == "update" and predicate(orjson.loads(e.data)), timeout
        )
        data: dict[str, Any] = orjson.loads(event.data)
        return data


def request_ids(update: dict[str, Any]) -> set[str]:
    return {row["request_id"] for row in update["active_requests"]}


class DeltaState:
    """A delta client's view (``?delta=1``), rebuilt from frames exactly as a browser would.

    ``update`` replaces everything; ``delta`` must be based on the version held (else the
    stream has a gap: AssertionError) and applies its removes, then its upserts.
    """

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.workers: list[dict[str, Any]] = []
        self.version: int | None = None
        self.frames = 0

    def apply(self, event: ServerSentEvent) -> None:
        if event.event not in ("update", "delta"):
            return
        data = orjson.loads(event.data)
        assert event.id == str(data["version"]), "id: must carry the version"
        if event.event == "update":
            self.rows = {row["key"]: row for row in data["active_requests"]}
            self.workers = data["workers"]
        else:
            assert data["base"] == self.version, f"gap: held {self.version}, got {data}"
            for key in data["remove"]:
                self.rows.pop(key, None)
            for row in data["upsert"]:
                self.rows[row["key"]] = row
            if "workers" in data:
                self.workers = data["workers"]
        self.version = data["version"]
        self.frames += 1

    @classmethod
    def replay(cls, reader: SSEReader) -> DeltaState:
        """The state after every event the reader got so far."""
        state = cls()
        state.apply_all(reader)
        return state

    def apply_all(self, reader: SSEReader, start: int = 0) -> int:
        """Apply the reader's events from index ``start``; returns the next index."""
        events = reader.events
        for _, event in events[start:]:
            self.apply(event)
        return len(events)


def keyed(rows: Iterable[schema.Row]) -> dict[str, dict[str, Any]]:
    """Rows by their row key, each with the ``key`` the stream service adds."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = row_key(row["worker_id"], row["request_id"])
        out[key] = {**row, "key": key}
    return out


def hub_truth(app: Any) -> dict[str, dict[str, Any]]:
    """Every row the app's hub holds, by row key (rows without ``duration_ms``)."""
    return keyed(row for view in app.state.hub.workers.values() for row in view.rows.values())


def same_rows(state: dict[str, dict[str, Any]], truth: dict[str, dict[str, Any]]) -> bool:
    """Rows equal field by field, ``duration_ms`` (informative) aside."""
    if set(state) != set(truth):
        return False
    return all(
        {k: v for k, v in state[rid].items() if k != "duration_ms"} == truth[rid] for rid in truth
    )
