"""The proxy's edges against real sockets and a real Redis: an upstream that breaks off
mid-body, request targets that would change the host, upstream credentials, and two
requests that bring the same X-Request-Id."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

from tests.serving import running
from tests.worker_harness import GatedUpstream, running_worker, worker_settings
from vdm_hub.shared import schema
from vdm_hub.shared.embedded_redis import free_port
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.store import read_worker_state

pytestmark = pytest.mark.integration


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, GatedUpstream]]:
    app = GatedUpstream()
    async with running(app, "upstream") as (url, _):
        yield url, app


async def _until(predicate: object, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def _completed(redis: aioredis.Redis, keys: Keys, n: int) -> list[schema.CompletedEntry]:
    async def enough() -> bool:
        return bool(await redis.xlen(keys.completed) >= n)

    await _until(enough)
    return [schema.decode_completed(i, f) for i, f in await redis.xrange(keys.completed)]


@pytest.fixture
async def breaking_upstream() -> AsyncIterator[str]:
    """Answers every request with a chunked 200 and one chunk, then hangs up mid-body."""
    clients: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
                b'e\r\ndata: {"a":1}\n\n\r\n'
            )
            await writer.drain()
        finally:
            writer.close()  # no last chunk: the body is incomplete

    def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(serve(reader, writer))
        clients.add(task)
        task.add_done_callback(clients.discard)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()
        for task in list(clients):
            task.cancel()


async def test_an_upstream_that_breaks_off_mid_body_is_not_a_clean_200(
    redis: aioredis.Redis, redis_url: str, key_prefix: str, keys: Keys, breaking_upstream: str
) -> None:
    settings = worker_settings(redis_url, key_prefix)
    async with (
        running_worker(settings, breaking_upstream) as (url, _app),
        httpx.AsyncClient(timeout=10) as client,
    ):
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json={"model": "m", "stream": True}
        ) as response:
            assert response.status_code == 200  # the head had been passed on already
            with pytest.raises(httpx.RemoteProtocolError):
                async for _ in response.aiter_raw():
                    pass
        (entry,) = await _completed(redis, keys, 1)
    assert (entry["outcome"], entry["status"]) == ("upstream_error", 200)


async def _raw_request(url: str, target: bytes) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET " + target + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize("form", ["@{host}/x", "//{host}/x", "http://{host}/x", "*"])
async def test_a_target_that_is_not_a_path_is_refused_and_never_reaches_another_host(
    redis_url: str, key_prefix: str, upstream: tuple[str, GatedUpstream], form: str
) -> None:
    up_url, up = upstream
    elsewhere = GatedUpstream()
    async with running(elsewhere, "elsewhere") as (other_url, _):
        target = form.format(host=other_url.removeprefix("http://")).encode()
        settings = worker_settings(redis_url, key_prefix)
        async with running_worker(settings, up_url) as (url, _app):
            answer = await _raw_request(url, target)
            normal = await _raw_request(url, b"/echo/ok?q=1")
    assert elsewhere.seen == [], "the request reached another host"
    assert normal.startswith(b"HTTP/1.1 200")
    if form.startswith("http://"):
        # Absolute form (RFC 9112 §3.2.2): the server reads the path out of it, and that path
        # goes to the configured upstream like any other.
        assert [s["path"] for s in up.seen] == ["/x", "/echo/ok"]
    else:
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert [s["path"] for s in up.seen] == ["/echo/ok"]


async def test_upstream_credentials_are_in_neither_the_502_nor_the_log(
    redis_url: str, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    password = "pw-s3cr3t-4321"
    dead = f"http://user:{password}@127.0.0.1:{free_port()}/base"
    settings = worker_settings(redis_url, key_prefix)
    caplog.set_level(logging.DEBUG)
    async with running_worker(settings, dead) as (url, app), httpx.AsyncClient() as client:
        response = await client.get(f"{url}/v1/models")
        assert app.publisher is not None
        record = app.publisher.record()
    assert response.status_code == 502
    assert response.json()["error"] == "upstream_unreachable"
    assert "127.0.0.1" in response.text  # the operator still learns which upstream
    for text in (response.text, caplog.text, str(record)):
        assert password not in text and "user:" not in text


async def test_two_requests_with_the_same_request_id_are_two_rows_and_two_entries(
    redis: aioredis.Redis,
    redis_url: str,
    key_prefix: str,
    keys: Keys,
    upstream: tuple[str, GatedUpstream],
) -> None:
    up_url, up = upstream
    settings = worker_settings(redis_url, key_prefix)
    async with running_worker(settings, up_url) as (url, _app), httpx.AsyncClient() as client:
        calls = [
            asyncio.create_task(
                client.post(
                    f"{url}/v1/messages",
                    json={"model": f"m-{gate}"},
                    headers={"x-gate": gate, "x-request-id": "dup-id"},
                )
            )
            for gate in ("g1", "g2")
        ]
        for gate in ("g1", "g2"):
            await asyncio.wait_for(up.arrival(gate).wait(), 10)

        async def two_rows() -> bool:
            return len((await read_worker_state(redis, keys, "w1")).rows) == 2

        await _until(two_rows)
        rows = (await read_worker_state(redis, keys, "w1")).rows
        assert "dup-id" in rows
        assert {r["model"] for r in rows.values()} == {"m-g1", "m-g2"}
        up.gate("g1").set()
        up.gate("g2").set()
        responses = await asyncio.gather(*calls)
        entries = await _completed(redis, keys, 2)
    ids = {r.headers["x-request-id"] for r in responses}
    assert len(ids) == 2 and "dup-id" in ids
    assert {e["request_id"] for e in entries} == ids == set(rows)
    assert {(e["request_id"], e["model"]) for e in entries} == {
        (rid, row["model"]) for rid, row in rows.items()
    }
