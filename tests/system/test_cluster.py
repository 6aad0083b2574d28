"""Redis Cluster: a real 3-master cluster on loopback, two workers and a stream service with
``VDM_REDIS_MODE=cluster`` and a hash-tagged prefix. ``REDIS_URL`` names a node that does NOT
own the fleet's slot, so everything the hub does is routed by the cluster client (scripts,
MULTI reads, the stream of finished requests, the subscription)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import orjson
import pytest
import redis

from tests.procs import vdm_hub
from tests.system.chaos_harness import (
    TTL_S,
    finish_load,
    fleet,
    load,
    report,
    wait_drained,
    wait_views_match,
)
from tests.system.redis_topology import Cluster, redis_cluster
from vdm_hub.shared.embedded_redis import EmbeddedRedis

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    proc = vdm_hub("demo-upstream", "--port", "0")
    try:
        yield proc.wait_ready(30)
    finally:
        proc.stop()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with redis_cluster() as c:
        yield c


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as c:
        yield c


async def _worker_ids(client: httpx.AsyncClient, stream_url: str) -> set[str]:
    snap = orjson.loads((await client.get(f"{stream_url}/metrics/active-requests")).content)
    return {w["worker_id"] for w in snap["workers"]}


@pytest.mark.timeout(120)
async def test_a_fleet_on_a_cluster_rows_appear_end_match_and_a_killed_worker_is_reaped(
    upstream_url: str, key_prefix: str, cluster: Cluster, client: httpx.AsyncClient
) -> None:
    prefix = "{" + key_prefix + "}"
    owner = cluster.node_owning(prefix + ":workers")
    entry = next(n for n in cluster.nodes if n is not owner)
    env = {"VDM_REDIS_MODE": "cluster", "VDM_KEY_PREFIX": prefix}
    async with fleet(upstream_url, prefix, n_workers=2, redis=entry, env=env) as f:
        async with load([w.url for w in f.workers]) as gen:
            gen.start()
            matched = await wait_views_match(
                gen, client, f.stream_url, since=time.monotonic(), what="cluster start"
            )
            report("cluster: first match after start", matched)
            assert await _worker_ids(client, f.stream_url) == {w.worker_id for w in f.workers}
            # Every key of the fleet is on the slot owner; the entry node holds none.
            with _sync(owner) as c:
                assert c.exists(prefix + ":workers", prefix + ":alive", prefix + ":seq") == 3
            with _sync(entry) as c:
                assert c.dbsize() == 0

            victim = f.workers[0]
            assert victim.proc is not None
            victim.proc.kill()
            killed_at = time.monotonic()
            deadline = killed_at + TTL_S + 10
            while victim.worker_id in await _worker_ids(client, f.stream_url):
                assert time.monotonic() < deadline, "the killed worker was never reaped"
                await asyncio.sleep(0.05)
            reaped = time.monotonic() - killed_at
            assert reaped <= TTL_S + 3, f"reaped {reaped:.2f}s after the kill (TTL {TTL_S}s)"
            matched = await wait_views_match(
                gen, client, f.stream_url, since=killed_at, what="cluster after the kill"
            )
            report("cluster: worker SIGKILL", matched, f"(reaped after {reaped:.2f}s)")
            await finish_load(gen)
        await wait_drained(client, f.stream_url)
        assert gen.stats.ok > 0
        # Finished requests reached the stream of completed requests on the slot owner.
        with _sync(owner) as c:
            assert c.xlen(prefix + ":completed") >= gen.stats.ok


def _sync(node: EmbeddedRedis) -> redis.Redis:
    return redis.Redis(host=node.host, port=node.port)
