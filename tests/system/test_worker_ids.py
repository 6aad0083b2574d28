"""Two live worker processes that would share an id, on real processes and a real Redis.

Before: both registered under the one id, each superseding the other, so the view flapped
between halves of the truth and each logged "heartbeat refused (reaped or superseded)" once a
second. Now the one that finds out moves to ID-2 with one warning naming both, and every sample
of Redis holds both processes' requests, under two ids, for good. The second case is issue
20's containers sharing a host name with pid 1 each (``docker --network host``): simulated by
running both with ``os.getpid`` answering 1, so the default ``{host}-{pid}`` is the same."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
import redis.asyncio as aioredis

from tests.procs import VDM_HUB, Proc, vdm_hub
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

PID_ONE = "import os; os.getpid = lambda: 1; from vdm_hub.services.cli import main; main()"


@pytest.fixture
def upstream() -> Iterator[str]:
    proc = vdm_hub("demo-upstream", "--port", "0")
    try:
        yield proc.wait_ready(30)
    finally:
        proc.stop()


def workers(command: list[str], upstream: str, env: dict[str, str]) -> list[Proc]:
    args = [*command, "worker", "--upstream", upstream, "--port", "0"]
    return [Proc(args, env=env, name=f"worker {n}") for n in (1, 2)]


@pytest.mark.parametrize(
    ("command", "worker_id", "expected"),
    [
        (VDM_HUB, "gw", ("gw", "gw-2")),
        ([sys.executable, "-c", PID_ONE], None, (f"{socket.gethostname()}-1",) * 2),
    ],
    ids=["one fixed id", "same host and pid"],
)
async def test_two_live_processes_never_share_an_id(
    upstream: str,
    redis: aioredis.Redis,
    redis_url: str,
    key_prefix: str,
    command: list[str],
    worker_id: str | None,
    expected: tuple[str, str],
) -> None:
    keys = Keys(key_prefix)
    base = expected[0]
    wanted = {base, f"{base}-2"}
    env = {
        "REDIS_URL": redis_url,
        "VDM_KEY_PREFIX": key_prefix,
        "VDM_WORKER_HEARTBEAT_INTERVAL": "0.2",
        # Long enough that a heartbeat delayed by a loaded machine does not let the second
        # process take the first one's id while it still lives (the claim trusts the TTL).
        "VDM_WORKER_TTL": "5",
        **({"VDM_WORKER_ID": worker_id} if worker_id else {}),
    }
    procs = workers(command, upstream, env)
    held: list[asyncio.Task[httpx.Response]] = []
    try:
        urls = [p.wait_ready(30) for p in procs]
        async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
            for n, url in enumerate(urls):
                held.append(
                    asyncio.create_task(
                        client.post(
                            f"{url}/v1/chat/completions",
                            json={"model": "m", "messages": []},
                            headers={"x-request-id": f"held-{n}", "x-demo-delay-ms": "90000"},
                        )
                    )
                )

            async def sample() -> dict[str, set[str]]:
                ids = {k.decode() for k in await redis.hkeys(keys.workers)}
                return {w: {r.decode() for r in await redis.hkeys(keys.active(w))} for w in ids}

            async with asyncio.timeout(45):
                while set(await sample()) != wanted or sum(map(len, (await sample()).values())) < 2:
                    await asyncio.sleep(0.05)
            # Every sample over many heartbeats: both processes, both requests, two ids.
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                view = await sample()
                assert set(view) == wanted, view
                assert set().union(*view.values()) == {"held-0", "held-1"}, view
                await asyncio.sleep(0.05)
            records = {
                w: schema.decode_worker_record(raw)
                for w, raw in (await redis.hgetall(keys.workers)).items()
            }
            assert len({r["instance"] for r in records.values()}) == 2
    finally:
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        for proc in procs:
            proc.stop()
    output = "\n".join(p.output for p in procs)
    warnings = [line for line in output.splitlines() if "is also in use by another" in line]
    assert len(warnings) == 1, output[-4000:]
    assert f"worker id {base} is also in use" in warnings[0]
    assert f"publishes as {base}-2" in warnings[0]
    assert output.count("heartbeat refused") <= 1 and "Traceback" not in output
