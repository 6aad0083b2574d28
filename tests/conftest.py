"""Fixtures shared by every test: a real Redis server for integration tests, fakeredis for
unit tests, and a unique key prefix per test so tests never see each other's keys."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from vdm_hub.shared.embedded_redis import EmbeddedRedis
from vdm_hub.shared.keys import Keys

_prefixes = itertools.count(1)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """One real redis-server (or valkey-server) on a free loopback port for the session."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def key_prefix() -> str:
    return f"t{os.getpid()}x{next(_prefixes)}"


@pytest.fixture
def keys(key_prefix: str) -> Keys:
    return Keys(key_prefix)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def fake_redis() -> AsyncIterator[aioredis.Redis]:
    import fakeredis

    client = fakeredis.FakeAsyncRedis()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def up_factory() -> Iterator[list[Any]]:
    """``vdm-hub up`` runs a test starts (``tests/uprun.Up``), each cleaned up whatever happens:
    no process of the run survives the test."""
    runs: list[Any] = []
    yield runs
    for run in runs:
        run.cleanup()
