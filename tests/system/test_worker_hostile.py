"""A real worker process under hostile HTTP: malformed requests, huge headers and bodies,
slowloris clients. It keeps serving a normal client meanwhile, and nothing it publishes to
Redis grows without bound (rows' path, model and method are clamped; rows stay decodable)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from tests.procs import Proc, vdm_hub, wait_for
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.store import read_worker_state

pytestmark = pytest.mark.system

# Long (settings allow 128 characters): rows must fit MAX_ROW_BYTES whatever the id.
WORKER_ID = "hostile-" + "w" * 112
# Loose: a loaded 2-core box shared with other test runs.
NORMAL_LATENCY_LIMIT_S = 3.0


@dataclass
class Worker:
    url: str
    host: str
    port: int
    proc: Proc


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    proc = vdm_hub("demo-upstream", "--port", "0")
    try:
        yield proc.wait_ready(30)
    finally:
        proc.stop()


@pytest.fixture
def worker(upstream_url: str, redis_url: str, key_prefix: str) -> Iterator[Worker]:
    proc = vdm_hub(
        "worker",
        "--upstream",
        upstream_url,
        "--port",
        "0",
        env={"REDIS_URL": redis_url, "VDM_KEY_PREFIX": key_prefix, "VDM_WORKER_ID": WORKER_ID},
    )
    try:
        url = proc.wait_ready(30)
        host, port = url.removeprefix("http://").rsplit(":", 1)
        yield Worker(url=url, host=host, port=int(port), proc=proc)
        assert proc.popen.poll() is None, f"the worker died:\n{proc.output[-3000:]}"
    finally:
        proc.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=20, trust_env=False) as c:
        yield c


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def _normal_requests(client: httpx.AsyncClient, url: str, n: int) -> list[float]:
    """``n`` ordinary proxied requests one after another; their latencies."""
    latencies = []
    for i in range(n):
        t0 = time.monotonic()
        response = await client.post(
            f"{url}/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hi {i}"}]},
            headers={"x-demo-delay-ms": "0"},
        )
        assert response.status_code == 200, response.text[:500]
        latencies.append(time.monotonic() - t0)
    return latencies


async def _raw_exchange(host: str, port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, read until the server closes or ``timeout``; what came back."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                out += chunk
                if b"\r\n\r\n" in out and out.startswith(b"HTTP/1.1 4"):
                    break
        return out
    except (ConnectionResetError, BrokenPipeError):
        return b""
    finally:
        writer.close()


MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET /\x00\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS ClientHello
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n"
    b"\r\nzz\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n",
    b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\xff" * 5000 + b"\r\n\r\n",
]


@pytest.mark.timeout(60)
async def test_malformed_requests_get_an_error_and_the_worker_keeps_serving(
    worker: Worker, client: httpx.AsyncClient
) -> None:
    answers = await asyncio.gather(
        *(_raw_exchange(worker.host, worker.port, data) for data in MALFORMED)
    )
    for data, answer in zip(MALFORMED, answers, strict=True):
        # A 4xx, or the connection closed: never a 5xx, never a hang (bounded above).
        assert not answer.startswith(b"HTTP/1.1 5"), (data[:60], answer[:200])
    assert any(a.startswith(b"HTTP/1.1 400") for a in answers)
    latencies = await _normal_requests(client, worker.url, 10)
    assert max(latencies) < NORMAL_LATENCY_LIMIT_S
    assert (await client.get(f"{worker.url}/_vdm/healthz")).status_code == 200


@pytest.mark.timeout(60)
async def test_huge_headers_are_refused_or_passed_without_harm(
    worker: Worker, client: httpx.AsyncClient
) -> None:
    for size in (100_000, 1_000_000):
        try:
            response = await client.get(
                f"{worker.url}/echo/x", headers={"x-huge": "a" * size}, timeout=10
            )
        except httpx.HTTPError:
            continue  # the server closed the connection: a refusal
        assert response.status_code < 500 or response.status_code == 502, response.status_code
    many = {f"x-h{i}": "v" * 100 for i in range(1000)}
    try:
        response = await client.get(f"{worker.url}/echo/x", headers=many, timeout=10)
        assert response.status_code < 500 or response.status_code == 502
    except httpx.HTTPError:
        pass
    latencies = await _normal_requests(client, worker.url, 10)
    assert max(latencies) < NORMAL_LATENCY_LIMIT_S


@pytest.mark.timeout(60)
async def test_a_20_mb_streamed_body_passes_without_being_buffered(
    worker: Worker, client: httpx.AsyncClient
) -> None:
    chunk = b'{"model": "m", "pad": "' + b"x" * (1 << 20)  # JSON-looking: the sniffer reads it
    size = 20 * len(chunk)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield chunk

    rss_before = _rss_kb(worker.proc.popen.pid)
    normal = asyncio.create_task(_normal_requests(client, worker.url, 10))
    response = await client.post(
        f"{worker.url}/echo/upload",
        content=body(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 200, response.text[:300]
    assert orjson.loads(response.content)["body_bytes"] == size
    latencies = await normal
    assert max(latencies) < NORMAL_LATENCY_LIMIT_S
    growth_mb = (_rss_kb(worker.proc.popen.pid) - rss_before) / 1024
    assert growth_mb < 15, f"worker RSS grew {growth_mb:.1f} MB for a {size >> 20} MB body"


@pytest.mark.timeout(60)
async def test_slowloris_clients_do_not_starve_a_normal_client(
    worker: Worker, client: httpx.AsyncClient
) -> None:
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\nX-Slow: " + b"s" * 200
    )
    stop = asyncio.Event()
    opened = 0

    async def slow_client() -> None:
        nonlocal opened
        try:
            _reader, writer = await asyncio.open_connection(worker.host, worker.port)
        except OSError:
            return
        opened += 1
        try:
            for byte in request:
                if stop.is_set():
                    return
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)
        except OSError:
            return  # the server hung up on us: fine
        finally:
            writer.close()

    slow = [asyncio.create_task(slow_client()) for _ in range(150)]
    try:
        await asyncio.sleep(0)

        async def all_open() -> None:
            while opened < 150:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(all_open(), 15)
        latencies = await _normal_requests(client, worker.url, 20)
    finally:
        stop.set()
        await asyncio.gather(*slow, return_exceptions=True)
    assert max(latencies) < NORMAL_LATENCY_LIMIT_S, latencies
    assert (await client.get(f"{worker.url}/_vdm/healthz")).status_code == 200


def _rid(name: str) -> str:
    return f"clamp-{name}-".ljust(64, "0")  # the longest X-Request-Id the worker takes


@pytest.mark.timeout(60)
async def test_rows_in_redis_are_clamped_for_huge_paths_and_model_names(
    worker: Worker, client: httpx.AsyncClient, redis: aioredis.Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    cases = {
        # 10 KB of ASCII, and of characters JSON escapes to six bytes each (\u0001): the
        # encoded row must still fit the readers' MAX_ROW_BYTES.
        # /echo holds a request when asked (x-demo-delay-ms) whatever the rest of its path.
        "ascii": ("/echo/" + "p" * 10_000, "m" * 10_000),
        "escaped": ("/echo/" + "%01" * 10_000, "\x01" * 10_000),
        "wide": ("/echo/" + "%F0%9F%98%80" * 3_000, "\U0001f600" * 10_000),
    }
    held = {
        name: asyncio.create_task(
            client.post(
                worker.url + path,
                content=orjson.dumps({"model": model, "stream": False}),
                headers={
                    "content-type": "application/json",
                    "x-request-id": _rid(name),
                    "x-demo-delay-ms": "3000",
                },
            )
        )
        for name, (path, model) in cases.items()
    }
    huge_id = asyncio.create_task(
        client.post(
            f"{worker.url}/echo/id",
            json={"model": "m"},
            headers={"x-request-id": "i" * 10_000, "x-demo-delay-ms": "3000"},
        )
    )

    async def raw_rows() -> dict[bytes, bytes]:
        found: dict[bytes, bytes] = await redis.hgetall(keys.active(WORKER_ID))
        if len(found) == 4 and all(
            schema.decode_row(v)["model"] is not None for v in found.values()
        ):
            return found
        return {}

    async with asyncio.timeout(15):
        rows = await raw_rows()
        while not rows:
            await asyncio.sleep(0.05)
            rows = await raw_rows()
    for request_id, raw in rows.items():
        assert len(raw) <= schema.MAX_ROW_BYTES, (request_id[:40], len(raw))
        row = schema.decode_row(raw)  # readers accept it: not skipped as oversized
        assert len(row["path"]) <= schema.MAX_PATH_CHARS
        assert row["model"] is not None and len(row["model"]) <= schema.MAX_MODEL_CHARS
        assert len(row["request_id"]) <= 64
    assert {_rid(n).encode() for n in cases} <= set(rows)
    # What the stream service would load is every row (none counted as malformed).
    state = await read_worker_state(redis, keys, WORKER_ID)
    assert state.malformed == 0 and len(state.rows) == 4

    responses = await asyncio.gather(*held.values(), huge_id)
    assert all(r.status_code < 500 for r in responses), [r.status_code for r in responses]
    assert len(responses[-1].headers["x-request-id"]) <= 64  # a fresh id, not the 10 KB one

    # The finished requests' history entries are bounded too.
    async with asyncio.timeout(10):
        while True:
            entries = await redis.xrange(keys.completed)
            if len(entries) >= 4:
                break
            await asyncio.sleep(0.05)
    for entry_id, fields in entries:
        assert all(len(v) <= 4 * schema.MAX_PATH_CHARS for v in fields.values())
        schema.decode_completed(entry_id, fields)


@pytest.mark.timeout(60)
async def test_many_methods_and_connection_floods_leave_it_healthy(
    worker: Worker, client: httpx.AsyncClient, redis: aioredis.Redis, key_prefix: str
) -> None:
    # A method name far longer than MAX_METHOD_CHARS, and a burst of connections that open
    # and close at once.
    answer = await _raw_exchange(
        worker.host, worker.port, b"M" * 500 + b" /echo/x HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert not answer.startswith(b"HTTP/1.1 5"), answer[:200]
    for _ in range(200):
        with socket.create_connection((worker.host, worker.port), timeout=5):
            pass
    wait_for(lambda: worker.proc.popen.poll() is None, 1)
    latencies = await _normal_requests(client, worker.url, 5)
    assert max(latencies) < NORMAL_LATENCY_LIMIT_S
    rows = await redis.hgetall(Keys(key_prefix).active(WORKER_ID))
    for raw in rows.values():
        assert len(schema.decode_row(raw)["method"]) <= schema.MAX_METHOD_CHARS
