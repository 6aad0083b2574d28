"""Fan-out under a client that never reads: the others are not delayed, the stuck one is dropped."""

from __future__ import annotations

import asyncio
import socket
import time
from urllib.parse import urlsplit

import orjson
import pytest
import redis.asyncio as aioredis
from httpx_sse import ServerSentEvent

from tests.stream_support import (
    FakeWorker,
    SSEReader,
    running_stream,
    settings_for,
    wait_ready,
    wait_until,
)
from vdm_hub.services.stream.fanout import Broadcaster
from vdm_hub.shared.keys import Keys

pytestmark = pytest.mark.integration

STREAM = "/metrics/active-requests/stream"


STUCK_FOR = 2.0  # seconds a send waits before the hand-run sweep calls it stuck


def _longest_send(bc: Broadcaster) -> float:
    """How long the oldest unfinished send of any client has been waiting (0 when none is)."""
    now = time.monotonic()
    return max((now - c.sending_since for c in bc._live if c.sending_since), default=0.0)


def _carries(event: ServerSentEvent, request_id: str) -> bool:
    """Whether an update or delta frame carries the row of ``request_id``."""
    if event.event not in ("update", "delta"):
        return False
    data = orjson.loads(event.data)
    rows = data["active_requests"] if event.event == "update" else data["upsert"]
    return any(row["request_id"] == request_id for row in rows)


def _stuck_client(url: str) -> socket.socket:
    """Connects, asks for the stream, and never reads: a tiny receive buffer fills at once."""
    parts = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parts.hostname, parts.port))
    sock.sendall(f"GET {STREAM} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
    return sock


@pytest.mark.timeout(90)
async def test_a_client_that_never_reads_delays_no_one_and_is_dropped(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    """While one client's send is stuck, every change still reaches the other clients; the
    send-timeout sweep then drops exactly the stuck one.

    The configured send timeout is long, so nothing drops the stuck client while the probes go
    out: had it held up the others, they would not see the probes until it was dropped. No
    latency is asserted (it depends on the machine's load); the sweep is then run by hand, with
    a timeout that only the stuck client's send has outlived (readers read all the time).
    """
    worker = FakeWorker(redis, keys, "w1")
    await worker.register()
    # Big frames (~250 KB) so the stuck client's buffers fill after a few updates.
    await worker.start(*(f"bulk-{i:05d}" for i in range(1000)))
    # No snapshot pacing here (its own test is in test_stream_delta.py): every probe must reach
    # every reader at once, whatever the frame size.
    settings = settings_for(
        redis_url, key_prefix, VDM_SSE_SEND_TIMEOUT="600", VDM_SSE_SNAPSHOT_MAX_BPS="1000000000"
    )
    async with running_stream(settings) as (url, app):
        await wait_ready(url)
        bc = app.state.broadcaster
        stuck = _stuck_client(url)
        try:
            # The readers take deltas: after the first snapshot only the probe rows reach them,
            # so what the test process parses stays small however big the stuck one's frames.
            readers = [SSEReader(url + STREAM + "?delta=1") for _ in range(10)]
            for reader in readers:
                await reader.__aenter__()
            try:
                await wait_until(lambda: bc.clients == 11, 10, "11 clients")
                for n in range(8):
                    rid = f"probe-{n}"
                    marks = [len(r.events) for r in readers]
                    await worker.start(rid)
                    seen = await asyncio.gather(
                        *(
                            r.wait(lambda e, rid=rid: _carries(e, rid), 30, after=mark)
                            for r, mark in zip(readers, marks, strict=True)
                        )
                    )
                    assert len(seen) == 10
                    assert bc.dropped == 0 and bc.clients == 11  # the stuck one is still there
                await wait_until(lambda: _longest_send(bc) > STUCK_FOR, 30, "a send stuck for 2 s")
                assert bc.sweep(STUCK_FOR) == 1
                await wait_until(lambda: bc.dropped == 1, 10, "the stuck client to be dropped")
                await wait_until(lambda: bc.clients == 10, 10, "10 clients left")
                assert all(not r.ended for r in readers)
            finally:
                for reader in readers:
                    await reader.__aexit__(None, None, None)
        finally:
            stuck.close()
