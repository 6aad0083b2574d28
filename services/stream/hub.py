"""The hub: one process's merged, in-memory view of every worker's requests in flight.

It follows the reader rules of wire protocol v1 (``docs/protocol.md``):

- subscribe to ``P:events`` FIRST and wait for the acknowledgement, then load every worker from
  the hashes; a batch that arrives meanwhile is compared with the loaded (epoch, seq), so
  nothing falls between the load and the subscription;
- per worker: unknown worker, new epoch or ``worker_up`` -> resync that worker from its hash;
  seq <= known -> duplicate; seq == known + 1 -> apply; seq > known + 1 -> gap -> resync;
  ``worker_down`` -> drop;
- a lost subscription -> reconnect with bounded backoff and resync everything. Nothing heals
  on a timer: the only periodic work is the reaper, which judges heartbeat deadlines.

Whether the view can be vouched for is :attr:`Hub.sync` (``services/stream/sync.py``): the
reader reports a lost link and a Redis that stops answering its PINGs, the reaper's probe
reports a Redis that refuses writes (so workers cannot heartbeat). While ``sync`` is stale
nobody is reaped, and once it is ok again every worker gets one TTL to heartbeat before its
deadline is judged: Redis's clock ran on while it was frozen or refusing writes, so every
deadline looks expired at the thaw. The reaper also reconciles the view with the workers Redis
knows, so a worker that vanished from Redis without a ``worker_down`` (a FLUSHALL, a deleted
key) leaves the view within a tick.

Rows live in their worker's view, by request id: ids are unique per worker only (a client's
retry can carry one id to two workers), so a row is named by (worker id, request id) wherever
it leaves the hub. Every change of the in-memory state bumps :attr:`Hub.version` and calls the
change callback (the fan-out's throttle decides when to publish). A batch also notes the
request ids it touched in ``WorkerView.changed``; a resync replaces the worker's view, which
the fan-out's row table diffs against the old one (``services/stream/table.py``). Anything
read from Redis is untrusted: bad messages and rows are skipped, counted and logged at a
bounded rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException, RedisError

from vdm_hub.services.stream.supervise import stop_if_cancelled
from vdm_hub.services.stream.sync import (
    NOT_ANSWERING,
    READER_CRASHED,
    SyncState,
    failure_reason,
    refusal_reason,
)
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.redis_client import drop_connections, ensure_topology, subscribed
from vdm_hub.shared.store import WireScripts, list_worker_ids

log = logging.getLogger("vdm.stream.hub")

# Reconnecting: the first retry goes at once on fresh connections; while Redis stays away the
# delay doubles up to a bound small enough that the view heals within ~0.5 s of its return.
BACKOFF_START = 0.05
BACKOFF_MAX = 0.5
# A subscription that hears nothing is not proof of a quiet fleet: a half-open link (a peer
# that vanished without a FIN/RST, a frozen Redis) looks the same. The hub PINGs on the
# subscription and treats this much silence as a lost connection.
PING_EVERY = 1.0
SILENCE_LIMIT = 5.0
# A PING unanswered this long: the view can no longer be vouched for (sync goes stale) well
# before the link is given up for lost. Also the bound of each of the reaper's probes.
STALE_AFTER = 2.0
# Workers read concurrently during a full resync (each read is one script round trip).
RESYNC_CONCURRENCY = 32
# The parts of the hub that report sync problems (services/stream/sync.py).
READER = "reader"
PROBE = "writes"


class Status(StrEnum):
    UP = "up"
    STALE = "stale"


class RateLimitedLog:
    """Log a repeated warning at most once per ``period`` seconds, with a suppressed count."""

    def __init__(self, logger: logging.Logger, period: float = 10.0) -> None:
        self._log = logger
        self._period = period
        self._next = 0.0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        self._next = now + self._period
        if self._suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, self._suppressed)
            self._suppressed = 0
        self._log.warning(msg, *args)


@dataclass
class WorkerView:
    """What the hub knows about one worker."""

    worker_id: str
    epoch: str
    seq: int
    record: schema.WorkerRecord | None
    rows: dict[str, schema.Row] = field(default_factory=dict)
    last_seen: float | None = None  # epoch s of the last heartbeat (deadline - ttl)
    status: str = Status.UP
    # Request ids whose row a batch started, changed or ended since the fan-out last looked
    # (services/stream/table.py), so a version costs O(changes). Code that edits ``rows`` of
    # a live view adds the id here; replacing the whole view (a resync) needs nothing.
    changed: set[str] = field(default_factory=set)

    @property
    def heartbeat_interval(self) -> float:
        return (
            self.record["heartbeat_interval"]
            if self.record
            else schema.DEFAULT_HEARTBEAT_INTERVAL_S
        )

    @property
    def ttl(self) -> float:
        return self.record["ttl"] if self.record else schema.DEFAULT_WORKER_TTL_S

    @property
    def cancellable(self) -> bool:
        """False only when the worker's record says it cannot stop its requests; a record
        without the field is an older worker, and those all listen for cancels."""
        return self.record is None or self.record.get("cancellable", True)

    def see_deadline(self, deadline_ms: float | None) -> None:
        if deadline_ms is not None:
            self.last_seen = deadline_ms / 1000.0 - self.ttl


@dataclass
class HubCounters:
    """Plain counters, read by the Prometheus collector at scrape time (no per-event cost)."""

    malformed: int = 0
    resyncs: int = 0
    full_resyncs: int = 0
    reaped: int = 0
    dropped_by_worker: dict[str, int] = field(default_factory=dict)
    last_lag_s: float = 0.0


class Hub:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        heartbeat_interval: float = schema.DEFAULT_HEARTBEAT_INTERVAL_S,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = WireScripts(redis, keys)
        self.workers: dict[str, WorkerView] = {}
        self.version = 0
        self.ready = False
        self.counters = HubCounters()
        self.reap_every = min(1.0, heartbeat_interval)
        self.on_change: Callable[[], None] = on_change or (lambda: None)
        self._bad = RateLimitedLog(log)
        self._subscribed = asyncio.Event()
        self.sync = SyncState(on_change=self._sync_changed)
        self._probed_at = time.time()  # wall time of the last probe that passed
        # Deadlines are judged only from a TTL after this Redis time (set after stale periods).
        self._judge_episode = 0
        self._judge_from_ms = -math.inf

    # ----------------------------------------------------------------- state changes

    def _changed(self) -> None:
        self.version += 1
        self.on_change()

    def _sync_changed(self) -> None:
        """Clients must learn at once: a change of ``sync`` is a new version like any other."""
        sync = self.sync
        if sync.ok:
            log.info("in sync with Redis again")
        else:
            log.warning("out of sync with Redis: %s", sync.reason)
        self._changed()

    def reader_crashed(self) -> None:
        """The reader loop died of a bug (its supervisor restarts it): nothing vouches for the
        view until the restarted reader has resynced."""
        self.ready = False
        self.sync.fail(READER, READER_CRASHED)

    def malformed(self, what: str, detail: object, n: int = 1) -> None:
        self.counters.malformed += n
        self._bad.warning("skipped malformed %s: %s", what, detail)

    def row_count(self) -> int:
        return sum(len(w.rows) for w in self.workers.values())

    def in_flight(self) -> dict[str, dict[str, int]]:
        """Requests in flight per worker and model; every known worker is there, idle ones too.

        The one count behind both the ``stats`` frame and the Prometheus in-flight gauge.
        """
        counts: dict[str, dict[str, int]] = {}
        for wid, view in self.workers.items():
            by_model = counts[wid] = {}
            for row in view.rows.values():
                model = row["model"] or schema.UNKNOWN_MODEL
                by_model[model] = by_model.get(model, 0) + 1
        return counts

    def rows(self) -> Iterable[schema.Row]:
        for view in self.workers.values():
            yield from view.rows.values()

    # ----------------------------------------------------------------- loading

    async def resync_worker(self, worker_id: str) -> None:
        """Replace one worker's view with its state in Redis (one atomic read)."""
        self.counters.resyncs += 1
        state = await self.scripts.read_worker_state(worker_id)
        if state.malformed:
            self.malformed(
                "hash entry", f"{state.malformed} in worker {worker_id!r}", state.malformed
            )
        self._install(worker_id, state)
        self._changed()

    def _install(self, worker_id: str, state: Any) -> None:
        if state.epoch is None or (state.record is None and state.deadline_ms is None):
            # No seq marker, or neither a record nor a deadline: the worker is gone (removed,
            # flushed, or never registered completely).
            self.workers.pop(worker_id, None)
            return
        view = WorkerView(
            worker_id=worker_id,
            epoch=state.epoch,
            seq=state.seq,
            record=state.record,
            rows=state.rows,
        )
        view.see_deadline(state.deadline_ms)
        self.workers[worker_id] = view

    async def full_resync(self) -> None:
        self.counters.full_resyncs += 1
        ids = sorted(await list_worker_ids(self.redis, self.keys))
        sem = asyncio.Semaphore(RESYNC_CONCURRENCY)

        async def read(wid: str) -> Any:
            async with sem:
                return await self.scripts.read_worker_state(wid)

        states = await asyncio.gather(*(read(wid) for wid in ids))
        bad = sum(s.malformed for s in states)
        if bad:
            self.malformed("hash entry", f"{bad} during full resync", bad)
        self.workers = {}
        for wid, state in zip(ids, states, strict=True):
            self._install(wid, state)
        self._changed()

    # ----------------------------------------------------------------- batches

    async def handle_message(self, data: bytes | str) -> None:
        """Apply one raw ``P:events`` message by the reader rules."""
        try:
            batch = schema.decode_batch(data)
        except schema.MalformedMessage as exc:
            self.malformed("message", exc)
            return
        wid = batch.worker_id
        view = self.workers.get(wid)
        events = batch.events
        kinds = set(map(type, events))
        if view is None or view.epoch != batch.epoch or schema.WorkerUp in kinds:
            if view is None and schema.WorkerDown in kinds:
                return  # the end of a worker we do not know: nothing to do
            await self.resync_worker(wid)
            return
        seq = batch.seq
        if seq <= view.seq:
            return  # duplicate (or already covered by a resync)
        if seq > view.seq + 1:
            dropped = self.counters.dropped_by_worker
            dropped[wid] = dropped.get(wid, 0) + (seq - view.seq - 1)
            await self.resync_worker(wid)
            return
        view.seq = seq
        self._apply(view, events)
        self._changed()

    def _apply(self, view: WorkerView, events: list[schema.Event]) -> None:
        rows = view.rows
        changed = view.changed
        newest_start: float | None = None
        for event in events:
            if isinstance(event, schema.Start):
                row = event.row
                if row.worker_id != view.worker_id:
                    self.malformed("event", f"row of {row.worker_id!r} in another's batch")
                    continue
                rows[row.request_id] = row.as_row()
                changed.add(row.request_id)
                newest_start = row.start_time
            elif isinstance(event, schema.Progress):
                current = rows.get(event.request_id)
                if current is not None:
                    changed.add(event.request_id)
                    current.update(event.changes())  # type: ignore[typeddict-item]
            elif isinstance(event, schema.End):
                if rows.pop(event.request_id, None) is not None:
                    changed.add(event.request_id)
            elif isinstance(event, schema.WorkerDown):
                self.workers.pop(view.worker_id, None)
                break
        if newest_start is not None:
            self.counters.last_lag_s = max(0.0, time.time() - newest_start)

    # ----------------------------------------------------------------- loops

    async def wait_subscribed(self) -> None:
        await self._subscribed.wait()

    async def run(self) -> None:
        """Subscribe, load, apply; on a lost connection reconnect and resync everything.

        After a fault every pooled connection may be stale (Redis restarted under it): they
        are dropped, and the first retry goes at once on fresh ones. The backoff only grows
        while Redis keeps failing, and resets once a resync succeeds.
        """
        backoff = 0.0
        while True:
            stop_if_cancelled()
            try:
                await ensure_topology(self.redis)
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.keys.events)
                    await subscribed(pubsub)
                    self._subscribed.set()
                    await self.full_resync()
                    if not self.ready:
                        log.info(
                            "in sync: %d workers, %d rows", len(self.workers), self.row_count()
                        )
                    self.ready = True
                    self.sync.clear(READER)
                    backoff = 0.0
                    await self._follow(pubsub)
            except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
                # RedisClusterException is not a RedisError: a cluster whose slot map is
                # being rebuilt (a failover) raises it, and it must not end the subscription.
                self.ready = False
                self._subscribed.clear()
                self.sync.fail(READER, failure_reason(exc))
                log.warning("lost Redis (%s); reconnecting in %.2fs", exc, backoff)
                with contextlib.suppress(RedisError, OSError):
                    await drop_connections(self.redis)
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX, max(BACKOFF_START, backoff * 2))

    async def _follow(self, pubsub: aioredis.client.PubSub) -> None:
        """Apply messages until the subscription fails or Redis leaves a PING unanswered past
        SILENCE_LIMIT; unanswered past STALE_AFTER, the view is stale until Redis answers.

        Silence counts from the first PING sent after the last reply, not from the last reply:
        a hub whose own loop was busy for seconds on an idle channel sent no PING meanwhile,
        and that is no sign of a frozen Redis."""
        loop = asyncio.get_running_loop()
        heard = next_ping = loop.time()
        unanswered: float | None = None  # loop time of the first PING since the last reply
        silent = False
        while True:
            stop_if_cancelled()
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=PING_EVERY)
            now = loop.time()
            if msg is not None:
                heard, unanswered = now, None
                if silent:
                    silent = False
                    self.sync.clear(READER)
                if msg.get("type") == "message":
                    await self.handle_message(msg["data"])
            waited = 0.0 if unanswered is None else now - unanswered
            if waited > STALE_AFTER and not silent:
                silent = True
                # Confirmed last when the last reply came (wall time, for clients).
                self.sync.fail(READER, NOT_ANSWERING, time.time() - (now - heard))
            if waited > SILENCE_LIMIT:
                # A TimeoutError (not a lost connection): the reason stays "not answering".
                raise TimeoutError(f"no reply on the subscription for {now - heard:.1f}s")
            if now >= next_ping:
                next_ping = now + PING_EVERY
                if unanswered is None:
                    unanswered = now
                await pubsub.ping()

    async def reap_once(self) -> None:
        """Probe Redis; if it accepts writes and the view is in sync, reconcile the view with
        the workers Redis knows, reap expired workers (idempotent across services) and refresh
        last_seen/status."""
        now = await self._probe()
        if now is None or not self.sync.ok:
            return  # deadlines prove nothing while workers could not have heartbeated
        deadlines: Any = await self.redis.zrange(self.keys.alive, 0, -1, withscores=True)
        alive: dict[str, float] = {}
        for raw, deadline in deadlines:
            alive[raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)] = deadline
        await self._reconcile(alive)
        changed = False
        for wid, deadline in alive.items():
            view = self.workers.get(wid)
            ttl = view.ttl if view is not None else schema.DEFAULT_WORKER_TTL_S
            if now < self._judge_from(now) + ttl * 1000.0:
                continue  # a fresh TTL after a stale period, before judging its deadline
            if deadline <= now:
                changed |= await self._reap(wid)
            elif view is not None:
                changed |= self._refresh_status(view, deadline, now)
        if changed:
            self._changed()

    async def _probe(self) -> float | None:
        """Redis's clock (epoch ms) if Redis accepts writes; else None, and ``sync`` says why."""
        try:
            now, refusal = await self._bounded_probe()
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            self.sync.fail(PROBE, failure_reason(exc), self._probed_at)
            raise
        if refusal is not None:
            # Workers' heartbeats are refused just like this write: a worker whose deadline
            # passes now is not dead.
            self.sync.fail(PROBE, refusal_reason(refusal), self._probed_at)
            return None
        self._probed_at = time.time()
        self.sync.clear(PROBE)
        return float(now)

    async def _bounded_probe(self) -> tuple[int, str | None]:
        """The probe, bounded like the reader's PINGs: a write that waits (CLIENT PAUSE WRITE)
        is refused too, for as long as it waits (the client's own timeout, with its retry,
        would take twice its socket timeout to say so). A first timeout is tried once more at
        once: this process's own loop, stalled for seconds on a starved host, times out a
        reply that is already waiting, and that is no sign of a Redis that does not answer."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STALE_AFTER):
                return await self.scripts.probe()
        async with asyncio.timeout(STALE_AFTER):
            return await self.scripts.probe()

    def _judge_from(self, now: float) -> float:
        """Redis time (ms) from which deadlines count: the first probe after the last stale
        period (minus infinity if there was none)."""
        if self._judge_episode != self.sync.stale_episodes:
            self._judge_episode = self.sync.stale_episodes
            self._judge_from_ms = now
        return self._judge_from_ms

    async def _reconcile(self, alive: dict[str, float]) -> None:
        """Resync every worker of the view that has no deadline in Redis: one that vanished
        without a ``worker_down`` (a FLUSHALL, a deleted key) is never reaped otherwise. The
        read decides (a worker registering right now is there), not the deadline list."""
        for wid in [w for w in self.workers if w not in alive]:
            await self.resync_worker(wid)

    async def _reap(self, wid: str) -> bool:
        """Reap one expired worker; True when the view changed."""
        if await self.scripts.remove(wid, reason="reaped", expired_only=True):
            self.counters.reaped += 1
            log.info("reaped worker %s (no heartbeat for its ttl)", wid)
            # Do not wait for our own notice: the rows are gone from Redis already.
            return self.workers.pop(wid, None) is not None
        if wid in self.workers:
            # Nothing removed: a heartbeat came in between (the worker lives on) or another
            # reaper won (its notice follows). Redis knows which: ask it rather than drop a
            # live worker until its next batch.
            await self.resync_worker(wid)
        return False

    @staticmethod
    def _refresh_status(view: WorkerView, deadline: float, now: float) -> bool:
        """Refresh last_seen and up/stale; True when the status changed."""
        view.see_deadline(deadline)
        stale = view.last_seen is not None and (
            now / 1000.0 - view.last_seen > 2 * view.heartbeat_interval
        )
        status = Status.STALE if stale else Status.UP
        if status == view.status:
            return False
        view.status = status
        return True

    async def reap_loop(self) -> None:
        while True:
            stop_if_cancelled()
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await self.reap_once()
            await asyncio.sleep(self.reap_every)
