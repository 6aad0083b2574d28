"""Fan-out: encode each change once, hand the same bytes to every SSE client.

Each publish (a "generation") turns what changed since the previous one into:

- one ``delta`` frame (``base`` = the previous published version), encoded once and sent to
  every delta client that is current; the change also goes into the ring of recent changes;
- the full snapshot (``update``), built only when a client (or a poller) asks for it, at most
  once per generation, from the row table's cached bytes.

A client never owns a queue: it compares generation numbers and sends the newest shared bytes.
A delta client that fell more than one publish behind gets ONE frame that brings it to the
newest version: a merged delta from its own version (memoised per from-version, so laggards
share it) or a snapshot when that is smaller or the ring no longer reaches back. The per-client
rules (which frame, pacing) are in ``services/stream/feeds.py``.

Throttle: ``AdaptiveThrottle`` (``services/stream/throttle.py``) spaces fan-outs by what the
last one cost; with no change at all an empty delta and a fresh ``update`` still go out every
interval.

Versions start at a random point per process: a ``Last-Event-ID`` that another stream service
(a restart, or a replica behind the same load balancer) handed out is then never mistaken for
one of ours -- it falls outside our ring and gets a snapshot.
"""

from __future__ import annotations

import asyncio
import gc
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

import orjson

from vdm_hub.services.stream import payloads
from vdm_hub.services.stream.frames import HEARTBEAT, encode_event
from vdm_hub.services.stream.hub import Hub
from vdm_hub.services.stream.ring import Change, ChangeRing, Span
from vdm_hub.services.stream.table import RowTable
from vdm_hub.services.stream.throttle import AdaptiveThrottle

# A full GC pass between fan-outs once the clients grew by this factor (CPython's own rule
# fires at ~1.25x the long-lived heap, so this one comes first), and not below this many.
GC_GROWTH = 1.1
GC_MIN_CLIENTS = 200
# Room for 2**52 changes above the random start, within JavaScript's exact integers (2**53).
VERSION_START_BITS = 52
# A poller of the JSON snapshot waits at most this long for a change to be published.
FRESH_WAIT = 0.5
# A delta carries the worker list when it changed; a change of the ``active`` counts alone
# (every start and end) at most this often. The list is ~100 bytes per worker, while the
# adaptive throttle sends an isolated change at once: on a lightly loaded service with tens of
# workers, a list per change would be most of every delta. Held-back counts go out when the
# window ends (a publish is scheduled for it), membership and status changes at once.
WORKER_COUNTS_EVERY = 0.25
# The sync fields of a broadcaster without a hub (tests of the fan-out alone).
OK_SYNC = b'"sync":"ok","sync_since":0,"sync_reason":null'


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

    ``delta_chunk`` is exactly what a delta client that had seen the previous publish must
    receive (the delta, plus the ``stats`` frame and heartbeat of this publish), joined once
    for everybody; ``snapshot_chunk()`` is the same for snapshot clients.

    All parked clients wait on ONE future per generation (not a future each): a publish is a
    single ``set_result`` and no per-client bookkeeping. A client that disconnects while parked
    is therefore not woken at once; it leaves at the next publish, which comes at least every
    interval.
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
        snapshot_bps: int = 1_000_000,
        ring: ChangeRing | None = None,
        changes: asyncio.Event | None = None,
    ) -> None:
        self.hub = hub
        self.interval = interval
        self.heartbeat = heartbeat
        self.throttle = AdaptiveThrottle(throttle)
        self.max_clients = max_clients
        self.snapshot_bps = snapshot_bps
        self._stats_summary = stats_summary
        self.table = RowTable()
        self.ring = ring or ChangeRing()
        self.offset = secrets.randbits(VERSION_START_BITS) if hub is not None else 0
        self.version = self.offset + (hub.version if hub is not None else 0)
        self.base = self.version
        self.timestamp = time.time()
        self.workers_json = b"[]"
        self.worker_counts_every = WORKER_COUNTS_EVERY
        self.workers_due: float | None = None  # monotonic time held-back counts must go out
        self._workers_sig: payloads.WorkerSignature = ((), ())
        self._workers_sent = -math.inf
        self.delta_frame = b""
        self.update_gen = 0
        self.stats_frame = b""
        self.stats_gen = 0
        self.heartbeat_gen = 0
        self.gen = 0
        self.delta_chunk = b""
        self.chunk_has_update = False
        self.closed = False
        self.clients = 0
        self.dropped = 0
        self.encodes = 0
        self.snapshots = 0  # full snapshots built (lazily, at most one per generation)
        self._snapshot: bytes | None = None
        self._update_frame: bytes | None = None
        self._snapshot_chunk: bytes | None = None
        self._chunk_parts: list[bytes] = []
        self._merged: dict[int, bytes] = {}  # from-version -> catch-up frame, this generation
        self._live: set[Client] = set()
        self._gc_clients = 0  # client count at the last full GC pass taken between fan-outs
        self._next: asyncio.Future[None] | None = None
        # Set on every change of the hub (``changes.set`` is the hub's ``on_change``).
        self._dirty = changes if changes is not None else asyncio.Event()
        self.encode_update()

    # ----------------------------------------------------------------- publishing

    def publish(self, *, update: bool = False, stats: bool = False, beat: bool = False) -> None:
        """Encode the requested frames and wake every client ONCE for all of them."""
        parts: list[bytes] = []
        if update:
            self._advance()
            parts.append(self.delta_frame)
        if stats and self._stats_summary is not None:
            self.stats_frame = encode_event("stats", orjson.dumps(self._stats_summary()))
            self.stats_gen += 1
            parts.append(self.stats_frame)
        if beat:
            self.heartbeat_gen += 1
            parts.append(HEARTBEAT)
        if not parts:
            return
        self.delta_chunk = parts[0] if len(parts) == 1 else b"".join(parts)
        self.chunk_has_update = update
        self._chunk_parts = parts[1:] if update else parts
        self._snapshot_chunk = None
        self.gen += 1
        self._wake_all()

    def _advance(self) -> None:
        """Take the hub's changes since the last publish: a new version, its delta, the ring."""
        now = time.time()
        hub = self.hub
        touched: set[str] = set()
        version = self.version
        if hub is not None:
            self.table.sync(hub)
            touched = self.table.take()
            version = self.offset + hub.version
        workers_changed = self._refresh_workers()
        base = self.version
        if version != base:
            self.ring.add(Change(version, base, frozenset(touched), workers_changed))
        upsert, remove = self.table.split(touched)
        data = payloads.delta(
            version,
            base,
            self.table.rows_json(self._shown(now), upsert),
            remove,
            now,
            self.workers_json if workers_changed else None,
            sync=self._sync(),
        )
        self.delta_frame = encode_event("delta", data, event_id=version)
        self.version, self.base, self.timestamp = version, base, now
        self.update_gen += 1
        self.encodes += 1
        self._snapshot = self._update_frame = None
        self._merged.clear()

    def _refresh_workers(self) -> bool:
        """Refresh the worker list; True when this publish's delta must carry it."""
        if self.hub is None:
            return False
        workers = payloads.worker_list(self.hub)
        self.workers_json = orjson.dumps(workers)  # snapshots always have the newest
        sig = payloads.signature(workers)
        if sig == self._workers_sig:
            # Nothing to send, also when held-back counts went back to the values last sent:
            # nothing is due then either (a due time left set would make run_updates spin).
            self.workers_due = None
            return False
        now = time.monotonic()
        due = self._workers_sent + self.worker_counts_every
        if sig[0] == self._workers_sig[0] and now < due:
            self.workers_due = due  # counts only, and the last list went out just now
            return False
        self._workers_sig, self._workers_sent, self.workers_due = sig, now, None
        return True

    def encode_update(self) -> None:
        self.publish(update=True)

    def encode_stats(self) -> None:
        self.publish(stats=True)

    def beat(self) -> None:
        self.publish(beat=True)

    def _sync(self) -> bytes:
        """The hub's sync fields. A change of them bumps the hub's version, so they are fixed
        within a version like the rows."""
        return self.hub.sync.fields_json if self.hub is not None else OK_SYNC

    def _shown(self, now: float) -> float:
        """The time rows' ``duration_ms`` are taken at: while the view is stale, the last
        moment it was confirmed."""
        return self.hub.sync.shown_time(now) if self.hub is not None else now

    # ----------------------------------------------------------------- frames on demand

    def snapshot(self) -> bytes:
        """The ``update`` payload of the newest version, built at most once per generation."""
        if self._snapshot is None:
            now = time.time()
            if self.hub is None:
                self._snapshot = payloads.disabled_snapshot(now)
            else:
                rows = self.table.rows_json(self._shown(now))
                self._snapshot = payloads.snapshot(
                    rows, self.workers_json, now, self.version, sync=self._sync()
                )
            self.snapshots += 1
        return self._snapshot

    @property
    def update_frame(self) -> bytes:
        if self._update_frame is None:
            self._update_frame = encode_event("update", self.snapshot(), event_id=self.version)
        return self._update_frame

    def snapshot_chunk(self) -> bytes:
        """What a snapshot client one publish behind receives (built once per generation)."""
        if self._snapshot_chunk is None:
            parts = self._chunk_parts
            if self.chunk_has_update:
                parts = [self.update_frame, *parts]
            self._snapshot_chunk = parts[0] if len(parts) == 1 else b"".join(parts)
        return self._snapshot_chunk

    def catch_up(self, held: int) -> bytes:
        """One frame taking a delta client from version ``held`` to the newest one.

        A merged delta when the ring reaches back to ``held`` and the delta is smaller than a
        snapshot, else the ``update``. Memoised per ``held`` until the next publish.
        """
        frame = self._merged.get(held)
        if frame is not None:
            return frame
        if held == self.version:
            span: Span | None = Span(frozenset(), False)  # current: an empty delta
        else:
            span = self.ring.since(held)
        if span is None:
            return self.update_frame  # the ring no longer reaches back (or never did)
        upsert, remove = self.table.split(span.touched)
        cost = self.table.estimate(upsert, remove)
        if cost and cost >= self.table.snapshot_size():  # a snapshot is no larger
            self._merged[held] = self.update_frame
            return self.update_frame
        now = time.time()
        data = payloads.delta(
            self.version,
            held,
            self.table.rows_json(self._shown(now), upsert),
            remove,
            now,
            self.workers_json if span.workers else None,
            sync=self._sync(),
        )
        frame = self._merged[held] = encode_event("delta", data, event_id=self.version)
        return frame

    async def fresh_snapshot(self) -> bytes:
        """The snapshot for a poller: waits (briefly) for a pending change to be published."""
        hub = self.hub
        if hub is not None and self.offset + hub.version != self.version and not self.closed:
            await asyncio.wait((self._waiter(),), timeout=FRESH_WAIT)
        return self.snapshot()

    # ----------------------------------------------------------------- waking

    def _waiter(self) -> asyncio.Future[None]:
        waiter = self._next
        if waiter is None or waiter.done():
            waiter = self._next = asyncio.get_running_loop().create_future()
        return waiter

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

    async def wait(self, client: Client, timeout: float | None = None) -> None:
        """Park ``client`` until the next publish or close (or ``timeout`` seconds)."""
        if client.gone or self.closed:
            return
        if timeout is None:
            await self._waiter()
        else:
            # asyncio.wait never cancels the shared future when the time is up.
            await asyncio.wait((self._waiter(),), timeout=timeout)

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
        """``close`` from a signal handler: scheduled on the loop rather than run re-entrantly.

        The loop is the one of the future parked clients wait on; with none parked, the flag
        is enough: a client checks it before it parks again.
        """
        self.closed = True
        waiter = self._next
        if waiter is not None and not waiter.get_loop().is_closed():
            waiter.get_loop().call_soon_threadsafe(self.close)

    # ----------------------------------------------------------------- loops

    async def run_updates(self) -> None:
        """Change-driven and periodic publishes, with ``stats`` riding on them.

        A publish goes out on a change (when the throttle allows), when held-back worker
        counts are due, or when none went out for an interval, so a periodic one is skipped
        while changes keep coming. The ``stats`` frame
        is due once per interval and joins whichever publish goes out then: one fan-out per
        wake-up instead of up to three, so a change never queues behind a stats fan-out.
        """
        last = time.monotonic()
        last_stats = -math.inf
        # A publish whose stats is due a little early still carries it, so stats keep to one
        # per interval instead of slipping to every other publish when the two beat.
        slack = min(self.interval / 4, max(self.throttle.cap, 0.05))
        if self._stats_summary is not None:
            self.publish(stats=True)  # so the first chunk of a new client already holds stats
            last_stats = time.monotonic()
        while True:
            deadline = last + self.interval
            if self.workers_due is not None:
                deadline = min(deadline, self.workers_due)
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._dirty.wait()
            except TimeoutError:
                pass
            rest = self.throttle.delay(time.monotonic())
            if rest > 0:
                await asyncio.sleep(rest)  # churn: everything meanwhile joins this publish
            self._dirty.clear()
            started = time.monotonic()
            cpu = time.thread_time()
            stats_due = started - last_stats >= self.interval - slack
            if stats_due:
                last_stats = started
            self.publish(update=True, stats=stats_due)
            # The woken clients' steps are queued ahead of ours: after this yield they have
            # sent, and the fan-out's cost includes them.
            await asyncio.sleep(0)
            last = time.monotonic()
            self.throttle.record(ended=last, cost=time.thread_time() - cpu)

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
