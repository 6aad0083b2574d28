"""The fan-out's copy of every row in flight: encoded once per change, kept in display order.

The hub applies batches to plain dicts; this table follows it at each publish and pays only
for what changed since the last look:

- a batch marks the request ids it touched in ``WorkerView.changed``; those rows are
  re-encoded (orjson, once per change) and their ids collected in :attr:`RowTable.pending`;
- a worker whose view object was replaced (a resync) is diffed, old rows against new, so only
  rows that really differ count as changed; a worker that disappeared (shutdown, reaped, full
  resync) takes all of its rows with it.

Display order (newest ``start_time`` first) is a sorted list kept with ``bisect`` on insert
and delete, so no version ever sorts all rows. A snapshot joins the cached bytes, splicing in
``duration_ms`` (informative: clients tick durations from ``start_time``).

Request ids are unique across the fleet in practice (the reference worker makes 32 hex digits
or takes a client's ``X-Request-Id``). Should two workers carry the same id, the table shows
the one written last and a removal by the other worker does not hide it.
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


class Entry:
    __slots__ = ("head", "key", "owner")

    def __init__(self, owner: str, key: tuple[float, str], head: bytes) -> None:
        self.owner = owner
        self.key = key  # (-start_time, request_id): ascending order is newest first
        self.head = head  # the row's JSON without its closing brace


def with_duration(entry: Entry, now: float) -> bytes:
    return entry.head + DURATION % max(0.0, (now + entry.key[0]) * 1000.0)


class RowTable:
    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.order: list[tuple[float, str]] = []
        self.pending: set[str] = set()  # ids changed since the last take()
        self.bytes = 0  # sum of the cached heads, for "is a snapshot cheaper?" estimates
        self._views: dict[str, WorkerView] = {}
        self._owned: dict[str, set[str]] = {}

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
                del self._owned[wid]

    def take(self) -> set[str]:
        """The ids changed since the last call (the next delta's upserts and removes)."""
        pending, self.pending = self.pending, set()
        return pending

    def _replace(self, wid: str, rows: Mapping[str, schema.Row]) -> None:
        owned = self._owned.setdefault(wid, set())
        for rid in [r for r in owned if r not in rows]:
            self._refresh(wid, rid, None)
        for rid, row in rows.items():
            self._refresh(wid, rid, row)

    def _refresh(self, wid: str, rid: str, row: schema.Row | None) -> None:
        entry = self.entries.get(rid)
        if row is None:
            if entry is not None and entry.owner == wid:
                self._drop(rid, entry)
                self.pending.add(rid)
            self._owned.get(wid, set()).discard(rid)
            return
        head = orjson.dumps(row)[:-1]
        key = (-row["start_time"], rid)
        self._owned.setdefault(wid, set()).add(rid)
        if entry is None:
            self.entries[rid] = Entry(wid, key, head)
            bisect.insort(self.order, key)
        elif entry.head == head and entry.owner == wid:
            return  # a resync that found the row as we had it
        else:
            if entry.key != key:
                self._unorder(entry.key)
                bisect.insort(self.order, key)
                entry.key = key
            self.bytes -= len(entry.head)
            entry.owner, entry.head = wid, head
        self.bytes += len(head)
        self.pending.add(rid)

    def _drop(self, rid: str, entry: Entry) -> None:
        del self.entries[rid]
        self._unorder(entry.key)
        self.bytes -= len(entry.head)

    def _unorder(self, key: tuple[float, str]) -> None:
        i = bisect.bisect_left(self.order, key)
        if i < len(self.order) and self.order[i] == key:
            del self.order[i]

    # ----------------------------------------------------------------- reading

    def rows_json(self, now: float, ids: Iterable[str] | None = None) -> bytes:
        """A JSON array of rows with ``duration_ms``: all of them newest first, or ``ids``."""
        entries = self.entries
        if ids is None:
            parts = [with_duration(entries[key[1]], now) for key in self.order]
        else:
            parts = [with_duration(entries[rid], now) for rid in ids if rid in entries]
        return b"[" + b",".join(parts) + b"]"

    def split(self, ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """``ids`` as (still here: upserts, gone: removes)."""
        entries = self.entries
        upsert: list[str] = []
        remove: list[str] = []
        for rid in ids:
            (upsert if rid in entries else remove).append(rid)
        return upsert, remove

    def estimate(self, upsert: list[str], remove: list[str]) -> int:
        """Bytes of a delta carrying these ids (for the "snapshot is cheaper" rule)."""
        entries = self.entries
        size = sum(len(entries[rid].head) for rid in upsert) + 24 * len(upsert)
        return size + sum(len(rid) + 3 for rid in remove)

    def snapshot_size(self) -> int:
        return self.bytes + 24 * len(self.entries)
