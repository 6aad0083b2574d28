"""Sentinel failover under load: a master, its replica and three sentinels on loopback; three
workers and a stream service with ``VDM_REDIS_MODE=sentinel``. The master is SIGKILLed while
requests are in flight; once the replica is promoted everything follows it: the view equals
the true in-flight set within 10 s and no proxied request fails because of it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from tests.procs import vdm_hub
from tests.system.chaos_harness import (
    finish_load,
    fleet,
    load,
    report,
    wait_drained,
    wait_views_match,
)
from tests.system.redis_topology import Sentinels, sentinel_setup

pytestmark = pytest.mark.system

FAILOVER_BUDGET_S = 10.0


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    proc = vdm_hub("demo-upstream", "--port", "0")
    try:
        yield proc.wait_ready(30)
    finally:
        proc.stop()


@pytest.fixture
def sentinels() -> Iterator[Sentinels]:
    with sentinel_setup() as s:
        yield s


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as c:
        yield c


@pytest.mark.timeout(150)
async def test_master_killed_under_load_everything_follows_the_new_master(
    upstream_url: str, key_prefix: str, sentinels: Sentinels, client: httpx.AsyncClient
) -> None:
    env = {
        "VDM_REDIS_MODE": "sentinel",
        "VDM_REDIS_SENTINELS": sentinels.addresses,
        "VDM_REDIS_SENTINEL_MASTER": "mymaster",
    }
    # TTL 10 s: a failover takes seconds, and the workers must not be reaped meanwhile (their
    # rows would go and come back: a flicker, not what this test is about).
    async with fleet(
        upstream_url, key_prefix, n_workers=3, redis=sentinels.master, env=env, ttl=10.0
    ) as f:
        async with load([w.url for w in f.workers]) as gen:
            gen.start()
            await wait_views_match(gen, client, f.stream_url, since=time.monotonic(), what="start")
            ok_before = gen.stats.ok
            sentinels.master.kill()
            killed_at = time.monotonic()
            matched = await wait_views_match(
                gen,
                client,
                f.stream_url,
                since=killed_at,
                timeout=FAILOVER_BUDGET_S + 10,
                what="after the failover",
                fresh=True,
            )
            sentinels.wait_promoted(5)  # it was the promotion that healed it
            report(
                "sentinel failover (master SIGKILL)",
                matched,
                f"(from the kill; sentinel down-after 1 s; {gen.stats.ok - ok_before} requests "
                "completed meanwhile)",
            )
            assert matched <= FAILOVER_BUDGET_S, f"view == truth only {matched:.2f}s after the kill"
            await finish_load(gen)
        await wait_drained(client, f.stream_url)
        assert gen.stats.failed_total == 0, gen.stats.failed
        assert gen.stats.ok > ok_before
