from __future__ import annotations

import httpx
import pytest

from vdm_hub.services.httppool import ShardedClients

pytestmark = pytest.mark.timeout(10)


def _make(size: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(limits=httpx.Limits(max_connections=size))


async def test_shards_hold_the_total_and_each_lease_takes_the_least_busy() -> None:
    sizes: list[int] = []

    def make(size: int) -> httpx.AsyncClient:
        sizes.append(size)
        return _make(size)

    pool = ShardedClients(make, 250, shard=100)
    try:
        assert len(pool.clients) == 3 and sum(sizes) >= 250 and max(sizes) <= 100
        with pool.lease() as a, pool.lease() as b, pool.lease() as c:
            assert len({id(a), id(b), id(c)}) == 3, "three leases on three idle shards"
            assert pool.in_flight == 3
            with pool.lease() as d:
                assert d in (a, b, c)
        assert pool.in_flight == 0
    finally:
        await pool.aclose()


async def test_a_lease_is_given_back_when_the_block_fails() -> None:
    pool = ShardedClients(_make, 10)
    try:
        with pytest.raises(RuntimeError), pool.lease():
            raise RuntimeError("upstream went away")
        assert pool.in_flight == 0
    finally:
        await pool.aclose()
