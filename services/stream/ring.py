"""The ring of recent changes: what a lagging or reconnecting delta client is missing.

Each published version that changed something leaves one entry: its version, the version it
was built on (``base``), the keys of the rows it touched (``services/stream/table.py``
``row_key``: a request id alone names no row, it is unique per worker only) and whether the
worker list changed. A client holding version ``v`` inside the ring is brought up to date by
the union of the entries after ``v``: for each key touched since, the *current* row is an
upsert and a missing row a remove. So "upserted then removed" is a remove, "removed then
upserted" an upsert, and the merged delta is never larger than the rows it names. Rows
themselves are not kept here (the row table has the current ones), which bounds the ring by
keys, not by row bytes.

Bounds: at most ``max_versions`` entries and ``max_ids`` touched keys in total (a key is ~50
bytes plus set overhead, so the default 100,000 keys is a few MB). The oldest entries go first;
a client whose version fell out of the ring gets a full snapshot instead.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

MAX_VERSIONS = 4096
MAX_IDS = 100_000


@dataclass(frozen=True, slots=True)
class Change:
    version: int
    base: int
    touched: frozenset[str]
    workers: bool


@dataclass(frozen=True, slots=True)
class Span:
    """Everything that changed from one version to the newest one."""

    touched: frozenset[str]
    workers: bool


class ChangeRing:
    def __init__(self, max_versions: int = MAX_VERSIONS, max_ids: int = MAX_IDS) -> None:
        self.max_versions = max_versions
        self.max_ids = max_ids
        self._entries: deque[Change] = deque()
        self._first = 0  # sequence number of _entries[0]
        self._index: dict[int, int] = {}  # base version -> sequence number of its entry
        self.ids = 0
        self.newest: int | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, change: Change) -> None:
        self._index[change.base] = self._first + len(self._entries)
        self._entries.append(change)
        self.ids += len(change.touched)
        self.newest = change.version
        while self._entries and (len(self._entries) > self.max_versions or self.ids > self.max_ids):
            old = self._entries.popleft()
            self._first += 1
            self.ids -= len(old.touched)
            del self._index[old.base]

    def covers(self, version: int) -> bool:
        return version == self.newest or version in self._index

    def since(self, version: int) -> Span | None:
        """What changed after ``version``; None when the ring no longer reaches back to it."""
        if version == self.newest:
            return Span(frozenset(), False)
        start = self._index.get(version)
        if start is None:
            return None
        entries = itertools.islice(self._entries, start - self._first, None)
        touched: set[str] = set()
        workers = False
        for entry in entries:
            touched |= entry.touched
            workers = workers or entry.workers
        return Span(frozenset(touched), workers)

    def clear(self) -> None:
        self._entries.clear()
        self._index.clear()
        self.ids = 0
        self.newest = None
