"""Fan-out under a client that never reads: the others are not delayed, the stuck one is dropped."""

from __future__ import annotations

import asyncio
import socket
import time
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from tests.stream_support import (
    FakeWorker,
    SSEReader,
    request_ids,
    running_stream,
    settings_for,
    wait_ready,
    wait_until,
)
from vdm_hub.shared.keys import Keys

pytestmark = pytest.mark.integration

STREAM = "/metrics/active-requests/stream"


def _stuck_client(url: str) -> socket.socket:
    """Connects, asks for the stream, and never reads: a tiny receive buffer fills at once."""
    parts = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parts.hostname, parts.port))
    sock.sendall(f"GET {STREAM} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
    return sock


@pytest.mark.timeout(60)
async def test_a_client_that_never_reads_delays_no_one_and_is_dropped(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    worker = FakeWorker(redis, keys, "w1")
    await worker.register()
    # Big frames (~250 KB) so the stuck client's buffers fill after a few updates.
    await worker.start(*(f"bulk-{i:05d}" for i in range(1000)))
    # No snapshot pacing here (its own test is in test_stream_delta.py): every probe must reach
    # every reader at once, whatever the frame size.
    settings = settings_for(
        redis_url, key_prefix, VDM_SSE_SEND_TIMEOUT="1.0", VDM_SSE_SNAPSHOT_MAX_BPS="1000000000"
    )
    async with running_stream(settings) as (url, app):
        await wait_ready(url)
        bc = app.state.broadcaster
        stuck = _stuck_client(url)
        try:
            readers = [SSEReader(url + STREAM) for _ in range(10)]
            for reader in readers:
                await reader.__aenter__()
            try:
                await wait_until(lambda: bc.clients == 11, 5, "11 clients")
                for n in range(8):
                    rid = f"probe-{n}"
                    sent = time.monotonic()
                    await worker.start(rid)
                    seen = await asyncio.gather(
                        *(
                            r.wait_update(lambda d, rid=rid: rid in request_ids(d), 5)
                            for r in readers
                        )
                    )
                    assert len(seen) == 10
                    # every reader saw the change well within the send timeout
                    assert time.monotonic() - sent < 1.0
                await wait_until(lambda: bc.dropped == 1, 10, "the stuck client to be dropped")
                await wait_until(lambda: bc.clients == 10, 5, "10 clients left")
                assert all(not r.ended for r in readers)
            finally:
                for reader in readers:
                    await reader.__aexit__(None, None, None)
        finally:
            stuck.close()
