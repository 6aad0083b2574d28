"""``vdm-hub instrument -- uvicorn MOD:app`` with an app that knows nothing of vdm-hub, in this
virtualenv (no install needed): one process, and ``--workers 2``.

Each serving process publishes under its own id, the supervising parent never does, the
requests reach the hub, and SIGTERM to the PID ``vdm-hub instrument`` was started with reaches
uvicorn itself (it replaced that process), which deregisters its workers on the way out.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from tests.procs import ROOT
from tests.system.integration_harness import Instrumented, answers, until
from vdm_hub.shared import schema
from vdm_hub.shared.embedded_redis import free_port
from vdm_hub.shared.keys import Keys

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

UVICORN = [sys.executable, "-m", "uvicorn", "tests.system.plain_app:app", "--host", "127.0.0.1"]


async def registered(redis: aioredis.Redis, keys: Keys) -> dict[str, schema.WorkerRecord]:
    raw: Any = await redis.hgetall(keys.workers)
    return {k.decode(): schema.decode_worker_record(v) for k, v in raw.items()}


@pytest.mark.parametrize("workers", [1, 2])
async def test_uvicorn_serves_instrumented_in_every_worker(
    workers: int, redis_url: str, key_prefix: str, redis: aioredis.Redis, tmp_path: Path
) -> None:
    keys = Keys(key_prefix)
    port = free_port()
    argv = [*UVICORN, "--port", str(port), "--workers", str(workers)]
    env = {"REDIS_URL": redis_url, "VDM_KEY_PREFIX": key_prefix, "PATH": "/usr/bin:/bin"}
    server = Instrumented(f"uvicorn --workers {workers}", argv, env, ROOT)
    try:
        records = await until(
            lambda: _at_least(redis, keys, workers), 60, f"{workers} registered workers", server
        )
        assert len(records) == workers
        pids = {record["pid"] for record in records.values()}
        # exec: the PID we started is uvicorn; with --workers it only supervises.
        assert (server.pid in pids) == (workers == 1)
        async with httpx.AsyncClient(trust_env=False) as client:
            url = f"http://127.0.0.1:{port}"
            await until(lambda: answers(client, url + "/ping"), 30, "uvicorn", server)
            answer = await client.get(url + "/slow", params={"ms": "50"})
            assert answer.text == "plain"
        await until(lambda: _finished(redis, keys, "/slow"), 10, "the finished /slow request")
        server.signal(signal.SIGTERM)
        # Uvicorn re-raises the signal after its graceful shutdown (exit by SIGTERM).
        code = await asyncio.to_thread(server.wait, 30)
        assert code in (0, -signal.SIGTERM), server.output[-3000:]
        assert await registered(redis, keys) == {}  # each worker deregistered on shutdown
    finally:
        server.stop()


async def _at_least(
    redis: aioredis.Redis, keys: Keys, count: int
) -> dict[str, schema.WorkerRecord] | None:
    records = await registered(redis, keys)
    return records if len(records) >= count else None


async def _finished(redis: aioredis.Redis, keys: Keys, path: str) -> bool:
    entries: Any = await redis.xrange(keys.completed)
    return path in {schema.decode_completed(i, f)["path"] for i, f in entries}
