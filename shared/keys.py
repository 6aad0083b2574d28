"""Every Redis key and channel of wire protocol v1, built next to the prefix.

Nothing else in the code base formats a key string: import :class:`Keys` instead. The names are
public (``docs/protocol.md``); third-party workers and operators' scripts depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOL_VERSION = 1


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "vdm"

    @property
    def workers(self) -> str:
        """HASH worker_id -> JSON worker record."""
        return f"{self.prefix}:workers"

    @property
    def alive(self) -> str:
        """ZSET worker_id -> heartbeat deadline (epoch ms)."""
        return f"{self.prefix}:alive"

    @property
    def seq(self) -> str:
        """HASH worker_id -> "epoch:seq" of the last batch applied to that worker's state."""
        return f"{self.prefix}:seq"

    @property
    def events(self) -> str:
        """Pub/sub channel of JSON batches (a change notice, never the truth)."""
        return f"{self.prefix}:events"

    @property
    def completed(self) -> str:
        """Capped STREAM of finished requests."""
        return f"{self.prefix}:completed"

    def cancel(self, worker_id: str) -> str:
        """Pub/sub channel on which stream services ask ``worker_id`` to cancel a request."""
        return f"{self.prefix}:cancel:{worker_id}"

    def active(self, worker_id: str) -> str:
        """HASH request_id -> JSON row of a request in flight on ``worker_id``. The truth."""
        return f"{self.prefix}:active:{worker_id}"
