"""The stream service as real processes: shutdown with open streams, two services, real workers."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
import redis.asyncio as aioredis

from tests.procs import Proc, vdm_hub, wait_for
from tests.stream_support import FAST, FakeWorker, request_ids, wait_until
from vdm_hub.shared.keys import Keys

pytestmark = pytest.mark.system

STREAM = "/metrics/active-requests/stream"


def _env(redis_url: str, key_prefix: str, **extra: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "VDM_KEY_PREFIX": key_prefix, **FAST, **extra}


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()


def _open_stream(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    sock.sendall(f"GET {STREAM} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.timeout(60)
def test_sigterm_with_100_open_streams_exits_within_2_seconds(
    redis_url: str, key_prefix: str, procs: list[Proc]
) -> None:
    proc = vdm_hub("stream", "--port", "0", env=_env(redis_url, key_prefix))
    procs.append(proc)
    url = proc.wait_ready()
    streams = [_open_stream(url) for _ in range(100)]
    try:
        for sock in streams:
            assert b"event: update" in _read_until(sock, b"event: update")
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        code = proc.popen.wait(timeout=10)
        elapsed = time.monotonic() - started
        assert code == 0, proc.output[-2000:]
        assert elapsed < 2.0, f"took {elapsed:.2f}s to exit"
        # every stream was ended by the server (chunked terminator), not cut mid-frame
        ended = sum(1 for sock in streams if _read_until(sock, b"0\r\n\r\n").endswith(b"0\r\n\r\n"))
        assert ended == 100
    finally:
        for sock in streams:
            sock.close()


async def test_two_stream_services_show_the_same_rows(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str, procs: list[Proc]
) -> None:
    a = vdm_hub("stream", "--port", "0", env=_env(redis_url, key_prefix))
    b = vdm_hub("stream", "--port", "0", env=_env(redis_url, key_prefix))
    procs += [a, b]
    urls = [await asyncio.to_thread(p.wait_ready) for p in (a, b)]
    workers = [FakeWorker(redis, keys, f"w{i}") for i in range(2)]
    for w in workers:
        await w.register()
    await workers[0].start("x1", "x2")
    await workers[1].start("y1")
    await workers[0].end("x1")
    async with httpx.AsyncClient(timeout=5) as client:

        async def both_show(expected: set[str]) -> bool:
            for url in urls:
                snap = (await client.get(url + "/metrics/active-requests")).json()
                if request_ids(snap) != expected:
                    return False
            return True

        await wait_until(lambda: both_show({"x2", "y1"}), 10, "both services show x2, y1")


@pytest.mark.timeout(90)
async def test_three_real_workers_union_and_a_killed_worker_vanishes(
    redis_url: str, key_prefix: str, procs: list[Proc]
) -> None:
    ttl = 2.0
    env = _env(redis_url, key_prefix, VDM_WORKER_TTL=str(ttl))
    upstream = vdm_hub("demo-upstream", "--port", "0", env=env)
    procs.append(upstream)
    upstream_url = await asyncio.to_thread(upstream.wait_ready)
    workers = [
        vdm_hub("worker", "--upstream", upstream_url, "--port", "0", env=env) for _ in range(3)
    ]
    procs += workers
    stream = vdm_hub("stream", "--port", "0", env=env)
    procs.append(stream)
    worker_urls = [await asyncio.to_thread(w.wait_ready) for w in workers]
    stream_url = await asyncio.to_thread(stream.wait_ready)

    expected: dict[int, set[str]] = {i: {f"req-{i}-{n}" for n in range(3)} for i in range(3)}
    async with httpx.AsyncClient(timeout=httpx.Timeout(5, read=60)) as client:

        async def held(worker_url: str, rid: str) -> None:
            # Held open by the upstream; cut when the test ends or the worker dies.
            with contextlib.suppress(httpx.HTTPError):
                await client.post(
                    worker_url + "/v1/chat/completions",
                    json={"model": "demo-model", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"X-Request-Id": rid, "x-demo-delay-ms": "60000"},
                )

        tasks = [
            asyncio.create_task(held(worker_urls[i], rid))
            for i, rids in expected.items()
            for rid in rids
        ]
        try:

            async def shown() -> set[str]:
                snap = (await client.get(stream_url + "/metrics/active-requests")).json()
                return request_ids(snap)

            union = set().union(*expected.values())
            await wait_until(lambda: _equals(shown(), union), 15, "the union of three workers")

            workers[1].kill()
            killed_at = time.monotonic()
            rest = expected[0] | expected[2]
            await wait_until(lambda: _equals(shown(), rest), ttl + 5, "killed worker to vanish")
            took = time.monotonic() - killed_at
            assert took <= ttl + 1.0, f"rows of the killed worker lingered {took:.2f}s"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _equals(value: object, expected: set[str]) -> bool:
    got = await value  # type: ignore[misc]
    return bool(got == expected)


def test_stream_cli_reports_a_busy_port(redis_url: str, key_prefix: str) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        port = holder.getsockname()[1]
        proc = vdm_hub("stream", "--port", str(port), env=_env(redis_url, key_prefix))
        wait_for(lambda: proc.popen.poll() is not None, 20, message="exit on a busy port")
        assert proc.popen.returncode == 1
        assert "cannot listen" in proc.output
    finally:
        holder.close()
