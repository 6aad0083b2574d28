"""The fan-out's copy of every row in flight: encoded once per change, kept in display order.

A row is named by (worker_id, request_id): request ids are unique per worker only (a client's
``X-Request-Id`` that a retry sends to another worker is on two workers at once), so the table,
the ring of changes and every delta name rows by :func:`row_key`, an opaque string the stream
service derives from that pair. It is carried in each row as ``key`` (never taken from a
worker's JSON), and ``delta.remove`` lists keys.

The hub applies batches to plain dicts; this table follows it at each publish and pays only
for what changed since the last look:

- a batch marks the request ids it touched in ``WorkerView.changed``; those rows are
  re-encoded (orjson, once per change) and their keys collected in :attr:`RowTable.pending`;
- a worker whose view object was replaced (a resync) is diffed, old rows against new, so only
  rows that really differ count as changed; a worker that disappeared (shutdown, reaped, full
  resync) takes all of its rows with it.

Display order (newest ``start_time`` first) is a sorted list kept with ``bisect`` on insert
and delete, so no version ever sorts all rows. A snapshot joins the cached bytes, splicing in
``duration_ms`` (informative: clients tick durations from ``start_time``).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import orjson

from vdm_hub.shared import schema

if TYPE_CHECKING:
    from vdm_hub.services.stream.hub import Hub, WorkerView

DURATION = b',"duration_ms":%.1f}'


def row_key(worker_id: str, request_id: str) -> str:
    """The fleet-wide name of a row: ``<worker_id>/<request_id>``, with ``%`` and ``/`` of the
    worker id percent-escaped so that the first ``/`` always ends it (two pairs never share a
    key). Readable in logs and the browser's DOM, but opaque to clients: they compare keys,
    they never take them apart."""
    if "/" in worker_id or "%" in worker_id:
        worker_id = worker_id.replace("%", "%25").replace("/", "%2F")
    return f"{worker_id}/{request_id}"


class Entry:
    __slots__ = ("head", "order", "tail")

    def __init__(self, order: tuple[float, str], head: bytes, tail: bytes) -> None:
        self.order = order  # (-start_time, key): ascending order is newest first
        self.head = head  # the row's JSON with its key, without the closing brace
        self.tail = tail  # b',"key":"…"': what follows the row's own fields in ``head``


def with_duration(entry: Entry, now: float) -> bytes:
    return entry.head + DURATION % max(0.0, (now + entry.order[0]) * 1000.0)


class RowTable:
    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}  # row key -> entry
        self.order: list[tuple[float, str]] = []
        self.pending: set[str] = set()  # keys changed since the last take()
        self.bytes = 0  # sum of the cached heads, for "is a snapshot cheaper?" estimates
        self._views: dict[str, WorkerView] = {}
        self._keys: dict[str, dict[str, str]] = {}  # worker id -> its request ids' row keys

    def __len__(self) -> int:
        return len(self.entries)

    # ----------------------------------------------------------------- following the hub

    def sync(self, hub: Hub) -> None:
        """Catch up with the hub: O(changes), plus O(rows of a worker) for each resync."""
        views = self._views
        workers = hub.workers
        for wid, view in workers.items():
            if views.get(wid) is view:
                if view.changed:
                    rows = view.rows
                    for rid in view.changed:
                        self._refresh(wid, rid, rows.get(rid))
                    view.changed.clear()
            else:
                self._replace(wid, view.rows)
                view.changed.clear()
                views[wid] = view
        if len(views) != len(workers):
            for wid in [w for w in views if w not in workers]:
                self._replace(wid, {})
                del views[wid]
                del self._keys[wid]

    def take(self) -> set[str]:
        """The keys changed since the last call (the next delta's upserts and removes)."""
        pending, self.pending = self.pending, set()
        return pending

    def _replace(self, wid: str, rows: Mapping[str, schema.Row]) -> None:
        owned = self._keys.setdefault(wid, {})
        for rid in [r for r in owned if r not in rows]:
            self._refresh(wid, rid, None)
        for rid, row in rows.items():
            self._refresh(wid, rid, row)

    def _refresh(self, wid: str, rid: str, row: schema.Row | None) -> None:
        keys = self._keys.setdefault(wid, {})
        if row is None:
            gone = keys.pop(rid, None)
            if gone is not None:
                self._drop(gone)
                self.pending.add(gone)
            return
        key = keys.get(rid)
        if key is None:
            key = keys[rid] = row_key(wid, rid)
            tail = b',"key":' + orjson.dumps(key)
            head = orjson.dumps(row)[:-1] + tail
            order = (-row["start_time"], key)
            self.entries[key] = Entry(order, head, tail)
            bisect.insort(self.order, order)
        else:
            entry = self.entries[key]
            head = orjson.dumps(row)[:-1] + entry.tail
            if entry.head == head:
                return  # a resync that found the row as we had it
            order = (-row["start_time"], key)
            if entry.order != order:
                self._unorder(entry.order)
                bisect.insort(self.order, order)
                entry.order = order
            self.bytes -= len(entry.head)
            entry.head = head
        self.bytes += len(head)
        self.pending.add(key)

    def _drop(self, key: str) -> None:
        entry = self.entries.pop(key)
        self._unorder(entry.order)
        self.bytes -= len(entry.head)

    def _unorder(self, order: tuple[float, str]) -> None:
        i = bisect.bisect_left(self.order, order)
        if i < len(self.order) and self.order[i] == order:
            del self.order[i]

    # ----------------------------------------------------------------- reading

    def rows_json(self, now: float, keys: Iterable[str] | None = None) -> bytes:
        """A JSON array of rows with ``duration_ms``: all of them newest first, or ``keys``."""
        entries = self.entries
        if keys is None:
            parts = [with_duration(entries[order[1]], now) for order in self.order]
        else:
            parts = [with_duration(entries[key], now) for key in keys if key in entries]
        return b"[" + b",".join(parts) + b"]"

    def split(self, keys: Iterable[str]) -> tuple[list[str], list[str]]:
        """``keys`` as (still here: upserts, gone: removes)."""
        entries = self.entries
        upsert: list[str] = []
        remove: list[str] = []
        for key in keys:
            (upsert if key in entries else remove).append(key)
        return upsert, remove

    def estimate(self, upsert: list[str], remove: list[str]) -> int:
        """Bytes of a delta carrying these keys (for the "snapshot is cheaper" rule)."""
        entries = self.entries
        size = sum(len(entries[key].head) for key in upsert) + 24 * len(upsert)
        return size + sum(len(key) + 3 for key in remove)

    def snapshot_size(self) -> int:
        return self.bytes + 24 * len(self.entries)
