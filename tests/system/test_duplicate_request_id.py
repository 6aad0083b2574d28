"""One ``X-Request-Id`` on two real workers (a client's retry that landed elsewhere, issue 20):
two rows in the view with their own keys, a Prometheus gauge that agrees with it, and a cancel
that stops exactly the request it names while the other keeps streaming.

Real processes throughout: the demo upstream streams slowly, two ``vdm-hub worker`` processes
proxy it, one ``vdm-hub stream`` merges them, all on a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.procs import Proc, vdm_hub
from tests.stream_support import wait_until
from vdm_hub.services.stream.table import row_key

pytestmark = [pytest.mark.system, pytest.mark.timeout(90)]

RID = "client-retry-1"
WORKERS = ("dup-w1", "dup-w2")


@pytest.fixture
def system(redis_url: str, key_prefix: str) -> Iterator[dict[str, str]]:
    base = {"REDIS_URL": redis_url, "VDM_KEY_PREFIX": key_prefix}
    procs: list[Proc] = []
    try:
        procs.append(vdm_hub("demo-upstream", "--port", "0"))
        upstream = procs[-1].wait_ready(30)
        for wid in WORKERS:
            procs.append(
                vdm_hub(
                    "worker",
                    "--upstream",
                    upstream,
                    "--port",
                    "0",
                    env={**base, "VDM_WORKER_ID": wid},
                )
            )
        stream_env = {
            **base,
            "VDM_CANCEL_ENABLED": "true",
            "VDM_ACTIVE_REQUESTS_SSE_INTERVAL": "0.5",
        }
        procs.append(vdm_hub("stream", "--port", "0", env=stream_env))
        urls = {wid: proc.wait_ready(30) for wid, proc in zip(WORKERS, procs[1:3], strict=True)}
        urls["stream"] = procs[3].wait_ready(30)
        yield urls
    finally:
        for proc in reversed(procs):
            proc.stop()


@contextlib.asynccontextmanager
async def slow_stream(client: httpx.AsyncClient, worker_url: str) -> AsyncIterator[Any]:
    """A chat completion streamed for ~100 s (one chunk per 100 ms), open once its first
    bytes are in: the worker has a row for it."""
    async with client.stream(
        "POST",
        f"{worker_url}/v1/chat/completions",
        json={
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
        },
        headers={"x-request-id": RID, "x-demo-chunks": "1000", "x-demo-chunk-delay-ms": "100"},
    ) as response:
        assert response.status_code == 200
        chunks = response.aiter_raw()
        async with asyncio.timeout(20):
            await anext(chunks)
        yield chunks


async def in_flight_gauge(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    per: dict[str, float] = {}
    for family in text_string_to_metric_families((await client.get(url + "/metrics")).text):
        if family.name == "vdm_requests_in_flight":
            for sample in family.samples:
                wid = sample.labels["worker"]
                per[wid] = per.get(wid, 0.0) + sample.value
    return {wid: n for wid, n in per.items() if n}


async def test_one_id_on_two_real_workers_two_rows_and_cancel_stops_only_the_named_one(
    system: dict[str, str],
) -> None:
    stream = system["stream"]
    one, two = (row_key(wid, RID) for wid in WORKERS)
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(10, read=30), trust_env=False) as client,
        slow_stream(client, system[WORKERS[0]]) as first,
        slow_stream(client, system[WORKERS[1]]) as second,
    ):

        async def view() -> dict[str, dict[str, Any]]:
            snap = (await client.get(stream + "/metrics/active-requests")).json()
            return {r["key"]: r for r in snap["active_requests"]}

        async def shows(keys: set[str]) -> bool:
            return set(await view()) == keys

        await wait_until(lambda: shows({one, two}), 15, "both requests as two rows")
        rows = await view()
        assert {(r["worker_id"], r["request_id"]) for r in rows.values()} == {
            (WORKERS[0], RID),
            (WORKERS[1], RID),
        }
        assert await in_flight_gauge(client, stream) == {WORKERS[0]: 1.0, WORKERS[1]: 1.0}

        cancel = f"{stream}/metrics/active-requests/{RID}/cancel"
        r = await client.post(cancel)
        assert r.status_code == 409, r.text
        assert r.json()["error"] == "ambiguous_request" and "worker_id" in r.json()["suggestion"]

        r = await client.post(cancel, params={"worker_id": WORKERS[1]})
        assert r.status_code == 202, r.text
        assert r.json()["worker_id"] == WORKERS[1]
        async with asyncio.timeout(10):  # the named request's client sees its stream cut
            with pytest.raises(httpx.RemoteProtocolError):
                async for _ in second:
                    pass
        await wait_until(lambda: shows({one}), 10, "only the named row to go")
        async with asyncio.timeout(10):  # the other request keeps streaming
            for _ in range(5):
                await anext(first)
        assert set(await view()) == {one}
        assert await in_flight_gauge(client, stream) == {WORKERS[0]: 1.0}
