"""Finished requests waiting to go into ``P:completed``, kept across a Redis outage.

Nothing finished is lost while the worker lives, up to a bound in bytes
(``VDM_COMPLETED_BACKLOG_BYTES``, 32 MiB by default: about 45,000 typical requests, a few
minutes of a busy worker's traffic). Past the bound the oldest entries go, and they are
counted: ``dropped`` (the worker record's ``completed_dropped``, exported by the stream
service as ``vdm_completed_dropped_total{worker}``) and ``unreported`` (what the publisher
logs, once per outage). Before, a ``deque(maxlen=2000)`` dropped them silently, about eight
seconds into an outage under load.

An entry's size is what it holds in memory, estimated without walking it (this runs once per
request): :data:`ENTRY_BYTES` for the dict and its fixed fields (measured with tracemalloc on
CPython 3.11: ~720 bytes for a typical entry), plus its variable-length strings.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from vdm_hub.shared.schema import CompletedEntry

ENTRY_BYTES = 640
LABEL_BYTES = 120  # per label: its two strings' headers and the dict slot


def entry_size(entry: CompletedEntry) -> int:
    size = ENTRY_BYTES + len(entry["request_id"]) + len(entry["path"]) + len(entry["model"] or "")
    labels = entry.get("labels")
    if labels:
        size += sum(LABEL_BYTES + len(k) + len(v) for k, v in labels.items())
    return size


class CompletedBacklog:
    """A FIFO of finished requests bounded by their size; the oldest go first when full."""

    __slots__ = ("_entries", "_sizes", "bytes", "dropped", "limit", "unreported")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: deque[CompletedEntry] = deque()
        self._sizes: deque[int] = deque()
        self.bytes = 0
        self.dropped = 0  # since the start
        self.unreported = 0  # since the publisher last logged a number

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def append(self, entry: CompletedEntry) -> None:
        size = entry_size(entry)
        self._entries.append(entry)
        self._sizes.append(size)
        self.bytes += size
        if self.bytes > self.limit:
            self._trim()

    def take(self, n: int) -> list[CompletedEntry]:
        """The ``n`` oldest entries (fewer when there are fewer), out of the backlog."""
        n = min(n, len(self._entries))
        for _ in range(n):
            self.bytes -= self._sizes.popleft()
        return [self._entries.popleft() for _ in range(n)]

    def put_back(self, entries: Iterable[CompletedEntry]) -> None:
        """Entries taken but not written go back in front, in their order (the oldest again
        first to go if that overflows)."""
        for entry in reversed(list(entries)):
            size = entry_size(entry)
            self._entries.appendleft(entry)
            self._sizes.appendleft(size)
            self.bytes += size
        if self.bytes > self.limit:
            self._trim()

    def _trim(self) -> None:
        while self.bytes > self.limit and self._entries:
            self._entries.popleft()
            self.bytes -= self._sizes.popleft()
            self.dropped += 1
            self.unreported += 1
