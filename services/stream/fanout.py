"""Fan-out: encode each snapshot once, hand the same bytes to every SSE client.

The broadcaster keeps exactly one current frame per kind (``update``, ``stats``) plus a
heartbeat generation. Publishing replaces the frame and wakes every waiting client; a client
that wakes sends whatever is current *then*, so a slow client skips versions instead of
queueing them (conflation): it holds a reference to one shared ``bytes`` object at most.

Throttle: a change after a quiet spell is encoded at once (leading edge); under churn at most
one encode per ``VDM_ACTIVE_REQUESTS_SSE_THROTTLE`` window; with no change at all a fresh
``update`` (new ``duration_ms`` values, same ``id``) still goes out every interval.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from services.stream.hub import Hub
from services.stream.sse import DISABLED_MESSAGE, DISABLED_SUGGESTION, encode_event


def build_snapshot(hub: Hub | None, now: float | None = None) -> dict[str, Any]:
    """The ``update`` payload: every row in flight (newest first) and every known worker."""
    now = time.time() if now is None else now
    if hub is None:
        return {
            "disabled": True,
            "message": DISABLED_MESSAGE,
            "suggestion": DISABLED_SUGGESTION,
            "active_requests": [],
            "workers": [],
            "timestamp": round(now, 3),
            "version": 0,
        }
    rows = sorted(hub.rows(), key=lambda r: r["start_time"], reverse=True)
    active = [
        {**row, "duration_ms": round(max(0.0, now - row["start_time"]) * 1000.0, 1)} for row in rows
    ]
    workers = []
    for wid in sorted(hub.workers):
        view = hub.workers[wid]
        record = view.record
        workers.append(
            {
                "worker_id": wid,
                "host": record["host"] if record else "",
                "pid": record["pid"] if record else 0,
                "started_at": record["started_at"] if record else None,
                "last_seen": view.last_seen,
                "status": view.status,
                "active": len(view.rows),
            }
        )
    return {
        "disabled": False,
        "active_requests": active,
        "workers": workers,
        "timestamp": round(now, 3),
        "version": hub.version,
    }


class Client:
    """One connected SSE client: whether it went away, and the future it is parked on."""

    __slots__ = ("gone", "waiter")

    def __init__(self) -> None:
        self.gone = False
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class Broadcaster:
    def __init__(
        self,
        hub: Hub | None,
        *,
        interval: float,
        heartbeat: float,
        throttle: float,
        max_clients: int,
        stats_summary: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.hub = hub
        self.interval = interval
        self.heartbeat = heartbeat
        self.throttle = throttle
        self.max_clients = max_clients
        self._stats_summary = stats_summary
        self.update_frame = b""
        self.update_gen = 0
        self.stats_frame = b""
        self.stats_gen = 0
        self.heartbeat_gen = 0
        self.closed = False
        self.clients = 0
        self.dropped = 0
        self.encodes = 0
        self._waiters: list[Client] = []
        self._dirty = asyncio.Event()
        # The serving loop, bound by the app's lifespan, for close_threadsafe.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.encode_update()

    # ----------------------------------------------------------------- publishing

    def notify_change(self) -> None:
        """The hub's change callback: O(1), whatever the event rate."""
        self._dirty.set()

    def encode_update(self) -> None:
        snapshot = build_snapshot(self.hub)
        data = orjson.dumps(snapshot)
        self.update_frame = encode_event("update", data, event_id=snapshot["version"])
        self.update_gen += 1
        self.encodes += 1
        self._wake_all()

    def encode_stats(self) -> None:
        if self._stats_summary is None:
            return
        self.stats_frame = encode_event("stats", orjson.dumps(self._stats_summary()))
        self.stats_gen += 1
        self._wake_all()

    def beat(self) -> None:
        self.heartbeat_gen += 1
        self._wake_all()

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, []
        for client in waiters:
            client.wake()

    async def wait(self, client: Client) -> None:
        """Park ``client`` until the next publish, close, or its own disconnect."""
        if client.gone or self.closed:
            return
        loop = asyncio.get_running_loop()
        client.waiter = loop.create_future()
        self._waiters.append(client)
        try:
            await client.waiter
        finally:
            client.waiter = None

    def close(self) -> None:
        """Make every open stream finish (called on SIGTERM before Uvicorn's shutdown)."""
        self.closed = True
        self._wake_all()

    def close_threadsafe(self) -> None:
        """``close`` from a signal handler: scheduled on the loop rather than run re-entrantly."""
        self.closed = True
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.close)

    # ----------------------------------------------------------------- loops

    async def run_updates(self) -> None:
        last = time.monotonic()
        while True:
            try:
                async with asyncio.timeout(max(0.0, last + self.interval - time.monotonic())):
                    await self._dirty.wait()
            except TimeoutError:
                pass
            # Leading edge: a change after a quiet window goes out at once; under churn the
            # next one waits for the rest of the window, collecting everything meanwhile.
            rest = last + self.throttle - time.monotonic()
            if rest > 0:
                await asyncio.sleep(rest)
            self._dirty.clear()
            self.encode_update()
            last = time.monotonic()

    async def run_stats(self) -> None:
        while True:
            self.encode_stats()
            await asyncio.sleep(self.interval)

    async def run_heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            self.beat()
