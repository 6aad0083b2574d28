"""The one Redis client builder, and what its clients do when the link or the master goes bad:
a half-open link is found and healed, a ``READONLY`` reply is a failover, not a data error."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from tests.stream_support import FakeWorker
from tests.system.chaos_harness import RedisLink
from vdm_hub.services.proxy.resp import RawRedis, pack
from vdm_hub.services.stream.hub import SILENCE_LIMIT, Hub
from vdm_hub.shared.embedded_redis import EmbeddedRedis
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.redis_client import FailoverAwareRedis, build_client
from vdm_hub.shared.settings import Settings
from vdm_hub.shared.store import WireScripts

pytestmark = pytest.mark.integration


async def test_every_mode_gets_timeouts_keepalive_and_a_health_check() -> None:
    standalone = build_client(Settings(redis_url="redis://127.0.0.1:1/0"))
    sentinel = build_client(
        Settings(redis_mode="sentinel", redis_sentinels=(("127.0.0.1", 1),), redis_url=None)
    )
    cluster = build_client(
        Settings(redis_mode="cluster", key_prefix="{v}", redis_url="redis://127.0.0.1:1")
    )
    tls_sentinel = build_client(
        Settings(
            redis_mode="sentinel",
            redis_sentinels=(("127.0.0.1", 1),),
            redis_url="rediss://u:pw@ignored:1/3",
        )
    )
    try:
        kw = tls_sentinel.connection_pool.connection_kwargs
        assert (kw["username"], kw["password"], kw["db"]) == ("u", "pw", 3)
        assert "host" not in kw and tls_sentinel.connection_pool.connection_class.__name__ == (
            "SentinelManagedSSLConnection"
        )
        for client in (standalone, sentinel):
            kw = client.connection_pool.connection_kwargs
            assert kw["socket_timeout"] and kw["socket_connect_timeout"], kw
            assert kw["socket_keepalive"] and kw["socket_keepalive_options"]
            assert kw["health_check_interval"] > 0
        assert isinstance(cluster, RedisCluster)
        # The worker's raw fast path only speaks to one plain standalone server.
        assert RawRedis.like(standalone) is not None
        assert RawRedis.like(sentinel) is None and RawRedis.like(cluster) is None
    finally:
        for client in (standalone, sentinel, cluster, tls_sentinel):
            await client.aclose()


async def test_a_unix_socket_url_works(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    with EmbeddedRedis(extra_args=["--unixsocket", str(sock)]):
        client = build_client(Settings(redis_url=f"unix://{sock}"))
        try:
            assert await client.ping()
            assert RawRedis.like(client) is None  # the raw fast path is TCP only
        finally:
            await client.aclose()


async def test_a_cluster_that_cannot_be_reached_raises_a_redis_error() -> None:
    # redis-py's own RedisClusterException is not a RedisError: every loop that survives a
    # lost Redis by catching RedisError (reaper, heartbeat) would have ended on it.
    from vdm_hub.shared.embedded_redis import free_port

    url = f"redis://127.0.0.1:{free_port()}"
    client = build_client(Settings(redis_mode="cluster", key_prefix="{v}", redis_url=url))
    try:
        with pytest.raises(RedisError):
            await client.zrange("{v}:alive", 0, -1)
        with pytest.raises(RedisError):
            await WireScripts(client, Keys("{v}")).redis_time_ms()
    finally:
        await client.aclose()


@pytest.mark.timeout(60)
async def test_a_half_open_subscription_is_found_and_the_view_heals(
    redis: aioredis.Redis, redis_server: EmbeddedRedis, keys: Keys
) -> None:
    # The subscription's link goes silent without a FIN or RST (a peer that vanished, a
    # stateful firewall that dropped the flow). Without a reply deadline of its own the hub
    # would wait on it for the kernel's retransmission timeout: minutes, missing every batch.
    worker = FakeWorker(redis, keys, "w1")
    await worker.register()
    async with RedisLink(redis_server.host, redis_server.port) as link:
        client = build_client(Settings(redis_url=link.url, key_prefix=keys.prefix))
        hub = Hub(client, keys)
        task = asyncio.create_task(hub.run())
        try:
            async with asyncio.timeout(10):
                while not hub.ready:
                    await asyncio.sleep(0.02)
            link.freeze()
            frozen_at = time.monotonic()
            await worker.start("after-freeze")
            async with asyncio.timeout(SILENCE_LIMIT + 15):
                while "after-freeze" not in hub.workers.get("w1", _NO_ROWS).rows:
                    await asyncio.sleep(0.02)
            healed = time.monotonic() - frozen_at
            print(f"[redis-client] half-open subscription healed after {healed:.2f}s")
            assert hub.counters.full_resyncs >= 2
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.aclose()


class _NoRows:
    rows: dict[str, object] = {}


_NO_ROWS = _NoRows()


@pytest.mark.timeout(60)
async def test_readonly_from_a_demoted_master_is_a_lost_connection(
    redis_server: EmbeddedRedis, keys: Keys
) -> None:
    # A replica answers writes with READONLY, as a demoted master does after a failover.
    with EmbeddedRedis() as replica:
        admin = aioredis.Redis.from_url(replica.url)
        client = build_client(Settings(redis_url=replica.url, key_prefix=keys.prefix))
        raw = RawRedis.like(client)
        assert raw is not None and isinstance(client, FailoverAwareRedis)
        try:
            await admin.execute_command("REPLICAOF", redis_server.host, str(redis_server.port))
            scripts = WireScripts(client, keys)
            with pytest.raises(RedisConnectionError, match="READONLY"):
                await client.set(keys.prefix + ":x", "1")
            with pytest.raises(RedisConnectionError, match="READONLY"):
                await raw.call(pack(["SET", keys.prefix + ":x", "1"]))
            # A script's write is refused the same way (what the worker's calls meet).
            worker = FakeWorker(client, keys, "w1")
            with pytest.raises(RedisConnectionError):
                await worker.register()
            with pytest.raises(RedisConnectionError):
                await scripts.remove("w1", reason="shutdown")
            # Reads still work there: nothing else is wrong with the connection's server.
            assert await client.get(keys.prefix + ":x") is None
        finally:
            raw.close()
            await client.aclose()
            await admin.aclose()
