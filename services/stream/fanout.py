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
import gc
import math
import time
from collections.abc import Callable
from typing import Any

import orjson

from services.stream.hub import Hub
from services.stream.sse import DISABLED_MESSAGE, DISABLED_SUGGESTION, HEARTBEAT, encode_event

# A full GC pass between fan-outs once the clients grew by this factor (CPython's own rule
# fires at ~1.25x the long-lived heap, so this one comes first), and not below this many.
GC_GROWTH = 1.1
GC_MIN_CLIENTS = 200


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
    """One connected SSE client, as the broadcaster sees it.

    ``sending_since`` is the monotonic time the client's current ``send`` began (0.0 when it is
    not inside one); the broadcaster's sweep cancels ``task`` when that is older than the send
    timeout. That replaces an ``asyncio.timeout`` around every send, which cost a timer handle
    and a ``current_task`` lookup per client per frame.
    """

    __slots__ = ("counted", "gone", "sending_since", "task", "timed_out")

    def __init__(self, task: asyncio.Task[Any] | None = None) -> None:
        self.gone = False
        self.sending_since = 0.0
        self.task = task
        self.timed_out = False
        self.counted = False


class Broadcaster:
    """Holds the current frames and wakes every parked client when they change.

    Every publish bumps ``gen`` and stores in ``delta`` exactly what a client that had seen the
    previous publish must receive (one frame, or the frames of one wake-up joined once for
    everybody). A client more than one publish behind rebuilds its chunk from the per-kind
    generations instead, which only a slow client ever does.

    All parked clients wait on ONE future per generation (not a future each): a publish is a
    single ``set_result`` and no per-client bookkeeping. A client that disconnects while parked
    is therefore not woken at once; it leaves at the next publish, and an ``update`` goes out
    at least every interval.
    """

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
        self.gen = 0
        self.delta = b""
        self.closed = False
        self.clients = 0
        self.dropped = 0
        self.encodes = 0
        self.last_update = 0.0  # monotonic time of the last update publish
        self._live: set[Client] = set()
        self._gc_clients = 0  # client count at the last full GC pass taken between fan-outs
        self._next: asyncio.Future[None] | None = None
        self._dirty = asyncio.Event()
        # The serving loop, bound by the app's lifespan, for close_threadsafe.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.encode_update()

    # ----------------------------------------------------------------- publishing

    def notify_change(self) -> None:
        """The hub's change callback: O(1), whatever the event rate."""
        self._dirty.set()

    def publish(self, *, update: bool = False, stats: bool = False, beat: bool = False) -> None:
        """Encode the requested frames and wake every client ONCE for all of them."""
        parts: list[bytes] = []
        if update:
            snapshot = build_snapshot(self.hub)
            data = orjson.dumps(snapshot)
            self.update_frame = encode_event("update", data, event_id=snapshot["version"])
            self.update_gen += 1
            self.encodes += 1
            self.last_update = time.monotonic()
            parts.append(self.update_frame)
        if stats and self._stats_summary is not None:
            self.stats_frame = encode_event("stats", orjson.dumps(self._stats_summary()))
            self.stats_gen += 1
            parts.append(self.stats_frame)
        if beat:
            self.heartbeat_gen += 1
            parts.append(HEARTBEAT)
        if not parts:
            return
        self.delta = parts[0] if len(parts) == 1 else b"".join(parts)
        self.gen += 1
        self._wake_all()

    def encode_update(self) -> None:
        self.publish(update=True)

    def encode_stats(self) -> None:
        self.publish(stats=True)

    def beat(self) -> None:
        self.publish(beat=True)

    def _wake_all(self) -> None:
        waiter, self._next = self._next, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
            # The ready queue is FIFO: this runs after every woken client's step, when the
            # fan-out is done and the loop is idle until the next change.
            waiter.get_loop().call_soon(self._after_fanout)

    def _after_fanout(self) -> None:
        """Take the full GC pass that client growth makes due now, between fan-outs.

        Every client holds ~60 GC-tracked objects, and CPython runs a full collection each
        time the long-lived heap has grown by a quarter, triggered by an allocation, i.e. in
        the middle of a fan-out (allocations come in bursts there): at 5,000 clients one pass
        is 100-150 ms that a change in flight waits for. Collecting a little earlier, here,
        keeps the automatic one from firing mid-fan-out; the cost is the same passes.
        """
        clients = self.clients
        if clients > self._gc_clients * GC_GROWTH + GC_MIN_CLIENTS:
            gc.collect()
            self._gc_clients = clients
        elif clients < self._gc_clients / 2:
            self._gc_clients = clients

    async def wait(self, client: Client) -> None:
        """Park ``client`` until the next publish or close."""
        if client.gone or self.closed:
            return
        waiter = self._next
        if waiter is None:
            waiter = self._next = asyncio.get_running_loop().create_future()
        await waiter

    # ----------------------------------------------------------------- clients

    def join(self, client: Client) -> None:
        self._live.add(client)
        client.counted = True
        self.clients += 1

    def leave(self, client: Client) -> None:
        """Idempotent: called when the client disconnects and again when its stream ends."""
        if client.counted:
            client.counted = False
            self.clients -= 1
        self._live.discard(client)

    def sweep(self, send_timeout: float, now: float | None = None) -> int:
        """Cancel every client whose current send has waited longer than ``send_timeout``."""
        now = time.monotonic() if now is None else now
        limit = now - send_timeout
        stuck = 0
        for client in self._live:
            since = client.sending_since
            if since and since < limit and not client.timed_out and client.task is not None:
                client.timed_out = True
                client.task.cancel()
                stuck += 1
        return stuck

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
        """Change-driven and periodic ``update``s, with ``stats`` riding on them.

        An ``update`` goes out on a change (leading-edge throttle) or when none went out for an
        interval, so a periodic one is skipped while changes keep coming. The ``stats`` frame
        is due once per interval and joins whichever update goes out then: one fan-out per
        wake-up instead of up to three, so a change never queues behind a stats fan-out.
        """
        last = time.monotonic()
        last_stats = -math.inf
        # An update whose stats is due a little early still carries it, so stats keep to one
        # per interval instead of slipping to every other update when the two beat.
        slack = min(self.interval / 4, max(self.throttle, 0.05))
        if self._stats_summary is not None:
            self.publish(stats=True)  # so the first chunk of a new client already holds stats
            last_stats = time.monotonic()
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
            now = time.monotonic()
            stats_due = now - last_stats >= self.interval - slack
            if stats_due:
                last_stats = now
            self.publish(update=True, stats=stats_due)
            last = time.monotonic()

    async def run_heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            self.beat()

    async def run_sweeps(self, send_timeout: float) -> None:
        """Enforce ``VDM_SSE_SEND_TIMEOUT``: a stuck client is dropped within 1.25 times of it."""
        period = max(0.05, min(1.0, send_timeout / 4))
        while True:
            await asyncio.sleep(period)
            self.sweep(send_timeout)
