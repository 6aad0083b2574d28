"""The one place that builds the project's Redis clients, from :class:`Settings`, for every
``VDM_REDIS_MODE``.

- ``standalone``: ``redis.asyncio.Redis.from_url(REDIS_URL)``.
- ``cluster``: ``redis.asyncio.cluster.RedisCluster.from_url(REDIS_URL)`` (any node; the rest
  of the cluster is discovered). Every key of a fleet is in one hash slot (the settings refuse
  an untagged ``VDM_KEY_PREFIX``), so the scripts and MULTI reads run on that slot's master.
  Pub/sub: redis-py's ``ClusterPubSub`` sends SUBSCRIBE to the node that owns the channel's
  slot, which is the fleet's slot. Classic PUBLISH is broadcast over the cluster bus, so any
  node would do; subscribing at the slot owner keeps the notices on the node whose scripts
  publish them.
- ``sentinel``: ``Sentinel(VDM_REDIS_SENTINELS).master_for(VDM_REDIS_SENTINEL_MASTER)``;
  every new connection asks the sentinels for the current master, and a ``READONLY`` reply
  (a demoted master) closes the connection and raises ``ConnectionError``. ``REDIS_URL``, if
  set, supplies only how to talk to the master (credentials, database, ``rediss://`` for TLS),
  never its address.

Every client gets socket timeouts, TCP keepalive and a health check, so a half-open link
fails a command within seconds instead of blocking it for the kernel's retransmission timeout
(minutes). In standalone mode a ``READONLY`` reply (a managed Redis whose primary endpoint
moved to a new master under us) is turned into a ``ConnectionError`` too: callers handle it
as a lost connection (reconnect and rewrite), never as a data error. Callers keep their own
retry loops; the client retries at most once, at once, on a fresh connection.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedSSLConnection
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisClusterException

from vdm_hub.shared.settings import Settings, redacted_url

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
CONNECT_TIMEOUT = 2.0
HEALTH_CHECK_INTERVAL = 10
# Idle 5 s, then a probe every 2 s, 3 lost probes: a dead peer found within ~11 s of silence.
# TCP_USER_TIMEOUT bounds how long written data may stay unacknowledged (a half-open link
# with a command in flight) to the same order.
_KEEPALIVE = {
    "TCP_KEEPIDLE": 5,
    "TCP_KEEPINTVL": 2,
    "TCP_KEEPCNT": 3,
    "TCP_USER_TIMEOUT": 11_000,
}


def keepalive_options() -> dict[int, int]:
    return {getattr(socket, k): v for k, v in _KEEPALIVE.items() if hasattr(socket, k)}


class FailoverAwareRedis(aioredis.Redis):
    """``Redis`` that treats ``READONLY`` as a lost master, and closes its sentinels."""

    owned_sentinel: Sentinel | None = None

    async def parse_response(
        self, connection: Connection, command_name: str | bytes, **options: Any
    ) -> Any:
        try:
            return await super().parse_response(connection, command_name, **options)
        except ReadOnlyError as exc:
            # The node we talk to was demoted (a failover): reconnecting finds the new master
            # (through the sentinels, or the managed service's endpoint).
            await connection.disconnect()
            raise RedisConnectionError(f"Redis answered READONLY (a failover?): {exc}") from exc

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.owned_sentinel is not None:
            for client in self.owned_sentinel.sentinels:
                await client.aclose()


class ClusterClient(RedisCluster):
    """``RedisCluster`` whose topology errors are ``ConnectionError``s.

    redis-py raises ``RedisClusterException`` (not a ``RedisError``) when no node answers or a
    slot has no owner, e.g. during a failover: every loop of the project that survives a lost
    Redis by catching ``RedisError`` (the reaper, the heartbeat) would end instead.
    """

    async def initialize(
        self,
        additional_startup_nodes_info: list[tuple[str, int]] | None = None,
        last_failed_node_name: str | None = None,
    ) -> RedisCluster:
        try:
            return await super().initialize(additional_startup_nodes_info, last_failed_node_name)
        except RedisClusterException as exc:
            raise RedisConnectionError(f"Redis Cluster unavailable: {exc}") from exc

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except RedisClusterException as exc:
            raise RedisConnectionError(f"Redis Cluster unavailable: {exc}") from exc


def _common(socket_timeout: float, retries: int) -> dict[str, Any]:
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": min(CONNECT_TIMEOUT, socket_timeout),
        "socket_keepalive": True,
        "socket_keepalive_options": keepalive_options(),
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "retry": Retry(NoBackoff(), retries),
        # redis-py 8 speaks RESP3 by default and converts every XREAD reply back to the RESP2
        # shape and every pub/sub message through its push handler: ~20% of the hub's CPU at
        # 50,000 events/s (py-spy, bench events), where the lag then grew instead of staying
        # flat. Standalone and sentinel clients need nothing of RESP3; the cluster client keeps
        # it (its pub/sub follows the slot owner through RESP3 push messages).
        "protocol": 2,
    }


def build_client(
    settings: Settings, *, socket_timeout: float = 3.0, retries: int = 1
) -> aioredis.Redis:
    """A client for ``settings``' Redis in its mode.

    ``socket_timeout`` bounds every command (keep it above any blocking read the caller
    makes, e.g. ``XREAD BLOCK``). ``retries``: immediate retries on a fresh connection after a
    connection error or timeout; 0 for a caller whose commands are not idempotent and that
    heals by itself (the worker's publisher rewrites its state after any failure).

    The cluster client is typed as ``Redis``: it implements the same command methods the
    project uses (scripts, pipelines with ``transaction=True`` on one slot, streams, pub/sub).
    Code that must tell them apart (the worker's raw fast path) checks ``isinstance``.
    """
    common = _common(socket_timeout, retries)
    url = settings.redis_url or DEFAULT_REDIS_URL
    if settings.redis_mode == "cluster":
        cluster_kw = {k: v for k, v in common.items() if k not in ("retry", "protocol")}
        # The cluster client keeps its own retry policy: it refreshes the slot map between
        # attempts, which is how it follows a failover or a resharding.
        return cast(aioredis.Redis, ClusterClient.from_url(url, **cluster_kw))
    if settings.redis_mode == "sentinel":
        master_kw = _master_credentials(settings.redis_url)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(settings.redis_sentinels),
            sentinel_kwargs={
                "socket_timeout": common["socket_timeout"],
                "socket_connect_timeout": common["socket_connect_timeout"],
                "socket_keepalive": True,
                "socket_keepalive_options": common["socket_keepalive_options"],
            },
            **common,
            **master_kw,
        )
        client = sentinel.master_for(settings.redis_sentinel_master, redis_class=FailoverAwareRedis)
        assert isinstance(client, FailoverAwareRedis)
        client.owned_sentinel = sentinel
        return client
    if url.startswith("unix:"):
        # TCP keepalive means nothing on a unix socket (and its connection class refuses it).
        common = {k: v for k, v in common.items() if not k.startswith("socket_keepalive")}
    return FailoverAwareRedis.from_url(url, **common)


def _master_credentials(url: str | None) -> dict[str, Any]:
    """From ``REDIS_URL`` in sentinel mode: how to talk to the master (user, password, db,
    TLS and its ``ssl_*`` query options), never where it is: the sentinels say that."""
    if not url:
        return {}
    try:
        parsed = parse_url(url)
    except ValueError as exc:  # settings validated it; never echo the password all the same
        raise ValueError(f"REDIS_URL={redacted_url(url)!r}: {exc}") from None
    out = {k: v for k, v in parsed.items() if k not in ("host", "port", "path", "connection_class")}
    if parsed.get("connection_class") is SSLConnection:
        out["connection_class"] = SentinelManagedSSLConnection
    return {k: v for k, v in out.items() if v is not None}


async def ensure_topology(client: aioredis.Redis) -> None:
    """Load a cluster client's slot map if it has none yet. Its pub/sub picks the node by
    slot without loading the map itself (redis-py 8), so a subscription made before any other
    command would find no node. A no-op for the other modes and once loaded."""
    if isinstance(client, RedisCluster):
        await client.initialize()


def unparsed_twin(client: aioredis.Redis, *commands: str) -> aioredis.Redis | None:
    """A client on ``client``'s connections whose ``commands`` answer Redis's reply as it
    comes (nested lists, or a map in RESP3), without redis-py's Python-level reshaping of it;
    None for a cluster client, which has no single pool (callers keep ``client`` then).

    For a reader of every entry of a busy stream: redis-py turns each XREAD entry into a dict,
    a Python loop per entry that cost as much as the rest of reading it.
    """
    if isinstance(client, RedisCluster):
        return None
    cls = FailoverAwareRedis if isinstance(client, FailoverAwareRedis) else aioredis.Redis
    twin = cls(connection_pool=client.connection_pool)  # shares the pool, never closes it
    for command in commands:
        twin.set_response_callback(command, _as_is)
    return twin


def _as_is(response: Any, **_options: Any) -> Any:
    return response


async def drop_connections(client: aioredis.Redis) -> None:
    """Close every idle pooled connection of ``client`` (they may be stale after a fault), so
    the next command opens a fresh one instead of failing on a dead socket first."""
    if isinstance(client, RedisCluster):
        for node in client.get_nodes():
            await node.disconnect()
        return
    await client.connection_pool.disconnect(inuse_connections=False)


async def subscribed(pubsub: Any, timeout: float = 10.0) -> None:
    """Wait for the acknowledgement of the SUBSCRIBE just sent on ``pubsub`` (a redis-py
    ``PubSub`` or ``ClusterPubSub``).

    "Subscribed" must mean acknowledged (broadcaster's trap): a message published between a
    reader's load of the state and its subscription would otherwise be lost unseen.
    """
    async with asyncio.timeout(timeout):
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
            if msg is not None and msg.get("type") == "subscribe":
                return
