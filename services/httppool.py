"""Outgoing HTTP connections in shards of pools, each request on the least busy shard.

httpcore's connection pool walks every connection and every queued request on each request
and each response, so one pool of a thousand connections makes every step cost a thousand:
with 1,000 requests in flight a worker spent about half its CPU in
``AsyncConnectionPool._assign_requests_to_connections`` (py-spy, bench ``fidelity``), its
event loop stalled for seconds, heartbeats timed out and live workers were reaped; the load
generator queued its own requests for seconds the same way. Shards of ``SHARD`` connections
keep each step small, and the least busy shard always has a free slot while fewer than
``total`` requests are in flight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import httpx

SHARD = 100


class ShardedClients:
    """``httpx.AsyncClient`` shards with room for ``total`` connections in all."""

    def __init__(
        self, make: Callable[[int], httpx.AsyncClient], total: int, shard: int = SHARD
    ) -> None:
        count = max(1, -(-total // shard))
        size = max(1, -(-total // count))
        self.clients = [make(size) for _ in range(count)]
        self._load = [0] * count

    @classmethod
    def of(cls, client: httpx.AsyncClient) -> ShardedClients:
        """One given client as a single shard (tests pass their own transport)."""
        return cls(lambda _size: client, 1)

    @property
    def in_flight(self) -> int:
        return sum(self._load)

    @contextlib.contextmanager
    def lease(self) -> Iterator[httpx.AsyncClient]:
        """The least busy shard, counted as busier until the block ends."""
        load = self._load
        shard = min(range(len(load)), key=load.__getitem__)
        load[shard] += 1
        try:
            yield self.clients[shard]
        finally:
            load[shard] -= 1

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()
