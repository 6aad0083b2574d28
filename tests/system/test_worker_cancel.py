"""Cancel, TTFT and chunk counts on real processes: a demo upstream and a worker
(``vdm-hub``), a real Redis, and cancel messages published as a stream service would.

A streamed Responses API request shows its model, `ttft_ms` and a growing `chunks_out` in
Redis; cancelled, its client sees the stream break off and the completed entry says
`cancelled`. A non-streaming request held upstream gets a 499. The worker logs both."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from tests.procs import Proc, vdm_hub
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.store import read_worker_state

pytestmark = [pytest.mark.system, pytest.mark.timeout(90)]

WORKER_ID = "cancel-w1"


@pytest.fixture
def worker(redis_url: str, key_prefix: str) -> Iterator[str]:
    upstream = vdm_hub("demo-upstream", "--port", "0")
    proc: Proc | None = None
    try:
        up_url = upstream.wait_ready(30)
        proc = vdm_hub(
            "worker",
            "--upstream",
            up_url,
            "--port",
            "0",
            env={"REDIS_URL": redis_url, "VDM_KEY_PREFIX": key_prefix, "VDM_WORKER_ID": WORKER_ID},
        )
        yield proc.wait_ready(30)
        assert proc.popen.poll() is None, f"the worker died:\n{proc.output[-3000:]}"
        for line in ("'streamed' asked by 'system-test'", "'held' asked by 'system-test'"):
            assert line in proc.output, proc.output[-3000:]
        # A deliberate abort is one log line, not Uvicorn's "Exception in ASGI application".
        assert "Traceback" not in proc.output, proc.output[-3000:]
    finally:
        if proc is not None:
            proc.stop()
        upstream.stop()


async def _until(predicate: object, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():  # type: ignore[operator]
            await asyncio.sleep(0.05)


async def test_cancel_a_streamed_and_a_waiting_request_on_real_processes(
    worker: str, redis: aioredis.Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    channel = keys.cancel(WORKER_ID)

    async def subscribed() -> bool:
        return bool(await redis.pubsub_numsub(channel) == [(channel.encode(), 1)])

    await _until(subscribed)

    async def cancel(request_id: str) -> None:
        await redis.publish(channel, orjson.dumps({"request_id": request_id, "by": "system-test"}))

    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        held = asyncio.create_task(
            client.post(
                f"{worker}/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                headers={"x-request-id": "held", "x-demo-delay-ms": "60000"},
            )
        )
        async with client.stream(
            "POST",
            f"{worker}/v1/responses",
            json={"model": "gpt-4.1", "input": "count slowly", "stream": True},
            headers={
                "x-request-id": "streamed",
                "x-demo-delay-ms": "0",
                "x-demo-chunks": "1000",
                "x-demo-chunk-delay-ms": "100",
            },
        ) as response:
            assert response.status_code == 200
            chunks = response.aiter_raw()
            got = b""
            async with asyncio.timeout(20):
                while b"response.output_text.delta" not in got:
                    got += await anext(chunks)

            async def live_row() -> bool:
                rows = (await read_worker_state(redis, keys, WORKER_ID)).rows
                row = rows.get("streamed")
                # Progress goes out at most every 0.5 s, so a count above the opening events
                # shows chunks_out growing while the stream runs.
                return (
                    row is not None
                    and row["ttft_ms"] is not None
                    and (row["chunks_out"] or 0) > 4
                    and "held" in rows
                )

            await _until(live_row)
            rows = (await read_worker_state(redis, keys, WORKER_ID)).rows
            assert (rows["streamed"]["model"], rows["streamed"]["is_streaming"]) == (
                "gpt-4.1",
                True,
            )
            assert rows["streamed"]["provider"] == "openai"
            assert rows["held"]["model"] == "gpt-4o-mini"
            assert rows["held"]["ttft_ms"] is None and rows["held"]["chunks_out"] is None

            await cancel("streamed")
            async with asyncio.timeout(10):
                with pytest.raises(httpx.RemoteProtocolError):
                    async for _ in chunks:
                        pass
        await cancel("held")
        answer = await asyncio.wait_for(held, 10)
    assert answer.status_code == 499 and answer.json()["error"] == "cancelled"

    async def both_done() -> bool:
        return bool(await redis.xlen(keys.completed) >= 2)

    await _until(both_done)
    entries = {
        e["request_id"]: e
        for e in (schema.decode_completed(i, f) for i, f in await redis.xrange(keys.completed))
    }
    assert (entries["streamed"]["outcome"], entries["streamed"]["status"]) == ("cancelled", 200)
    assert (entries["held"]["outcome"], entries["held"]["status"]) == ("cancelled", 499)
    assert (await read_worker_state(redis, keys, WORKER_ID)).rows == {}
