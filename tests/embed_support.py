"""Helpers for the tests of ``vdm_hub.instrument``: the user's environment, and what Redis
holds of the instrumented app."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys

FAST = {"VDM_WORKER_HEARTBEAT_INTERVAL": "0.2", "VDM_WORKER_TTL": "2"}


@pytest.fixture
def app_env(monkeypatch: pytest.MonkeyPatch, redis_url: str, key_prefix: str) -> dict[str, str]:
    """The environment a user sets for their app (read when ``instrument`` is called)."""
    values = {"REDIS_URL": redis_url, "VDM_KEY_PREFIX": key_prefix, **FAST}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


async def until(predicate: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    async with asyncio.timeout(timeout):
        while not (value := await predicate()):
            await asyncio.sleep(0.02)
        return value


async def workers(redis: aioredis.Redis, keys: Keys) -> set[str]:
    return {k.decode() for k in await redis.hkeys(keys.workers)}


async def completed(redis: aioredis.Redis, keys: Keys) -> list[schema.CompletedEntry]:
    return [schema.decode_completed(i, f) for i, f in await redis.xrange(keys.completed)]
