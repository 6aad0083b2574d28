"""The worker proxy against a real Redis and a real (in-loop) upstream over sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import msgspec
import orjson
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


async def _until(predicate: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def _batches(pubsub: aioredis.client.PubSub, until_type: str) -> list[schema.Batch]:
    out: list[schema.Batch] = []
    async with asyncio.timeout(5):
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if msg is None:
                continue
            batch = schema.decode_batch(msg["data"])
            out.append(batch)
            if any(e.type == until_type for e in batch.events):
                return out


async def test_request_start_and_end_write_hash_batches_and_completed_entry(
    redis: aioredis.Redis,
    redis_url: str,
    key_prefix: str,
    keys: Keys,
    upstream: tuple[str, GatedUpstream],
) -> None:
    up_url, up = upstream
    settings = worker_settings(redis_url, key_prefix)
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(keys.events)
        async with running_worker(settings, up_url) as (url, _app), httpx.AsyncClient() as client:
            body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
            call = asyncio.create_task(
                client.post(
                    f"{url}/v1/chat/completions?x=1",
                    json=body,
                    headers={"x-gate": "a", "x-request-id": "req-1"},
                )
            )
            await asyncio.wait_for(up.arrival("a").wait(), 5)

            # The start can go out before the proxy has read the body; the model follows in a
            # progress event at most one flush window later.
            async def row_visible_with_model() -> bool:
                rows = (await read_worker_state(redis, keys, "w1")).rows
                return "req-1" in rows and rows["req-1"]["model"] is not None

            await _until(row_visible_with_model)
            row = (await read_worker_state(redis, keys, "w1")).rows["req-1"]
            assert row["model"] == "gpt-test"
            assert row["path"] == "/v1/chat/completions"  # no query string
            assert (row["method"], row["provider"], row["phase"]) == ("POST", "openai", "upstream")
            assert row["is_streaming"] is False

            up.gate("a").set()
            response = await call
            assert response.status_code == 200
            assert response.headers["x-request-id"] == "req-1"
            batches = await _batches(pubsub, "end")

            async def row_gone() -> bool:
                return not (await read_worker_state(redis, keys, "w1")).rows

            await _until(row_gone)

    seqs = [b.seq for b in batches]
    assert seqs == list(range(1, len(seqs) + 1)), "sequence numbers are contiguous from 1"
    assert len({b.epoch for b in batches}) == 1
    types = [e.type for b in batches for e in b.events]
    assert types[0] == "worker_up" and types[-1] == "end" and "start" in types
    end = next(e for b in batches for e in b.events if isinstance(e, schema.End))
    assert (end.status, end.outcome, end.input_tokens, end.output_tokens) == (
        200,
        "ok",
        11,
        5,
    )
    ((entry_id, fields),) = await redis.xrange(keys.completed)
    entry = schema.decode_completed(entry_id, fields)
    assert (entry["request_id"], entry["model"], entry["status"], entry["outcome"]) == (
        "req-1",
        "gpt-test",
        200,
        "ok",
    )
    assert entry["bytes_out"] == len(response.content)


async def test_streamed_response_reaches_client_before_upstream_finishes(
    redis: aioredis.Redis,
    redis_url: str,
    key_prefix: str,
    keys: Keys,
    upstream: tuple[str, GatedUpstream],
) -> None:
    up_url, up = upstream
    settings = worker_settings(redis_url, key_prefix)
    async with running_worker(settings, up_url) as (url, _app), httpx.AsyncClient() as client:
        body = {"model": "m-stream", "stream": True, "messages": []}
        async with client.stream(
            "POST",
            f"{url}/v1/chat/completions",
            json=body,
            headers={"x-gate": "s", "x-request-id": "req-s"},
        ) as response:
            chunks = response.aiter_raw()
            async with asyncio.timeout(5):
                first = await anext(chunks)
            assert first.startswith(b"data: ")
            assert not up.gate("s").is_set(), "first chunk arrived while upstream still open"

            async def streaming_phase() -> bool:
                rows = (await read_worker_state(redis, keys, "w1")).rows
                row = rows.get("req-s")
                return row is not None and row["phase"] == "streaming"

            await _until(streaming_phase)
            row = (await read_worker_state(redis, keys, "w1")).rows["req-s"]
            assert row["is_streaming"] is True and row["bytes_out"] == len(first)
            up.gate("s").set()
            rest = b"".join([c async for c in chunks])
        assert rest.endswith(b"data: [DONE]\n\n")

        async def finished() -> bool:
            return await redis.xlen(keys.completed) == 1

        await _until(finished)
    ((entry_id, fields),) = await redis.xrange(keys.completed)
    entry = schema.decode_completed(entry_id, fields)
    assert (entry["input_tokens"], entry["output_tokens"]) == (7, 2)


async def test_client_disconnect_ends_record_at_once(
    redis: aioredis.Redis,
    redis_url: str,
    key_prefix: str,
    keys: Keys,
    upstream: tuple[str, GatedUpstream],
) -> None:
    up_url, up = upstream
    settings = worker_settings(redis_url, key_prefix)
    async with running_worker(settings, up_url) as (url, _app):
        client = httpx.AsyncClient()
        call = asyncio.create_task(
            client.post(
                f"{url}/v1/messages",
                json={"model": "claude-x"},
                headers={"x-gate": "never", "x-request-id": "req-gone"},
            )
        )
        await asyncio.wait_for(up.arrival("never").wait(), 5)
        call.cancel()
        await client.aclose()  # closes the socket: the worker sees the disconnect

        async def ended() -> bool:
            return await redis.xlen(keys.completed) == 1

        await _until(ended)
        ((entry_id, fields),) = await redis.xrange(keys.completed)
        entry = schema.decode_completed(entry_id, fields)
        assert (entry["request_id"], entry["outcome"], entry["status"]) == (
            "req-gone",
            "client_closed",
            0,
        )
        assert not up.gate("never").is_set()
        assert (await read_worker_state(redis, keys, "w1")).rows == {}


async def test_unreachable_upstream_gives_502_json_and_upstream_error(
    redis: aioredis.Redis, redis_url: str, key_prefix: str, keys: Keys
) -> None:
    settings = worker_settings(redis_url, key_prefix)
    dead = f"http://127.0.0.1:{free_port()}"
    async with running_worker(settings, dead) as (url, _app), httpx.AsyncClient() as client:
        response = await client.get(f"{url}/v1/models")
        assert response.status_code == 502
        assert response.json()["error"] == "upstream_unreachable"

        async def ended() -> bool:
            return await redis.xlen(keys.completed) == 1

        await _until(ended)
    ((entry_id, fields),) = await redis.xrange(keys.completed)
    entry = schema.decode_completed(entry_id, fields)
    assert (entry["status"], entry["outcome"]) == (502, "upstream_error")


async def test_own_endpoints_are_not_proxied(
    redis_url: str, key_prefix: str, upstream: tuple[str, GatedUpstream]
) -> None:
    up_url, up = upstream
    settings = worker_settings(redis_url, key_prefix)
    async with running_worker(settings, up_url) as (url, app), httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/_vdm/healthz")).json() == {"status": "ok"}
        status = (await client.get(f"{url}/_vdm/status")).json()
        assert status["worker_id"] == "w1" and status["connected"] is True
        assert up.seen == []
        assert app.publisher is not None and app.publisher.active == {}


async def test_hop_by_hop_headers_dropped_end_to_end_kept(
    redis_url: str, key_prefix: str, upstream: tuple[str, GatedUpstream]
) -> None:
    up_url, up = upstream
    settings = worker_settings(redis_url, key_prefix)
    async with running_worker(settings, up_url) as (url, _), httpx.AsyncClient() as client:
        response = await client.post(
            f"{url}/anything",
            content=b"payload",
            headers={"x-custom": "kept", "proxy-authorization": "dropped", "te": "trailers"},
        )
        assert response.status_code == 200
        seen = up.seen[-1]
        assert seen["headers"]["x-custom"] == "kept"
        assert "proxy-authorization" not in seen["headers"] and "te" not in seen["headers"]
        assert seen["body"] == b"payload"


async def test_metrics_off_publishes_nothing(
    redis: aioredis.Redis,
    redis_url: str,
    key_prefix: str,
    keys: Keys,
    upstream: tuple[str, GatedUpstream],
) -> None:
    up_url, _up = upstream
    settings = worker_settings(redis_url, key_prefix, LOG_REQUEST_METRICS="false")
    async with running_worker(settings, up_url) as (url, app), httpx.AsyncClient() as client:
        assert app.publisher is None
        assert (await client.post(f"{url}/v1/messages", json={"model": "x"})).status_code == 200
    assert await redis.keys(f"{key_prefix}:*") == []


async def test_secrets_never_reach_redis(
    redis: aioredis.Redis,
    redis_url: str,
    key_prefix: str,
    keys: Keys,
    upstream: tuple[str, GatedUpstream],
) -> None:
    up_url, up = upstream
    secrets = ["sk-header-secret-1", "qs-secret-2", "body-secret-3", "xkey-secret-4"]
    settings = worker_settings(redis_url, key_prefix)
    published: list[bytes] = []
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(keys.events)
        async with running_worker(settings, up_url) as (url, _), httpx.AsyncClient() as client:
            call = asyncio.create_task(
                client.post(
                    f"{url}/v1/chat/completions?api_key={secrets[1]}&stream=true",
                    content=orjson.dumps(
                        {"model": "m", "stream": True, "messages": [{"content": secrets[2]}]}
                    ),
                    headers={
                        "authorization": f"Bearer {secrets[0]}",
                        "x-api-key": secrets[3],
                        "content-type": "application/json",
                        "x-gate": "sec",
                    },
                )
            )
            await asyncio.wait_for(up.arrival("sec").wait(), 5)
            # While in flight: the row is in Redis, the secrets are not.
            await _until(lambda: _has_rows(redis, keys))  # type: ignore[arg-type]
            snapshot_during = await _dump(redis, key_prefix)
            up.gate("sec").set()
            assert (await call).status_code == 200
            batches = await _batches(pubsub, "end")
            published = [msgspec.json.encode(b) for b in batches]
        snapshot_after = await _dump(redis, key_prefix)
    assert up.seen[-1]["headers"]["authorization"] == f"Bearer {secrets[0]}"  # it was proxied
    everything = snapshot_during + snapshot_after + b"".join(published)
    assert b"chat/completions" in everything
    for secret in secrets:
        assert secret.encode() not in everything, secret


async def _has_rows(redis: aioredis.Redis, keys: Keys) -> bool:
    return bool(await redis.hlen(keys.active("w1")))


async def _dump(redis: aioredis.Redis, prefix: str) -> bytes:
    """Every key name and value under ``prefix``, whatever its type."""
    out = []
    async for key in redis.scan_iter(match=f"{prefix}:*"):
        kind = (await redis.type(key)).decode()
        out.append(key)
        if kind == "hash":
            for k, v in (await redis.hgetall(key)).items():
                out += [k, v]
        elif kind == "zset":
            out += [m for m, _ in await redis.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            for _id, fields in await redis.xrange(key):
                for k, v in fields.items():
                    out += [k, v]
        elif kind == "string":
            out.append(await redis.get(key))
    return b"\n".join(out)
