"""The stream service under a low open-file limit (issue 20, case 8).

A real ``vdm-hub stream`` process started with a small ``RLIMIT_NOFILE`` (soft below hard):
it raises the soft limit to the hard one, caps ``VDM_MAX_SSE_CLIENTS`` to what that allows
(logging both numbers), answers streams past the cap with 503 and ``Retry-After``, and keeps
answering ``/healthz`` and ``/readyz``. Before, clients past the limit were reset and
``/healthz`` failed with ``EMFILE``.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.procs import Proc
from vdm_hub.shared.fdlimit import FD_RESERVE

pytestmark = [pytest.mark.system, pytest.mark.timeout(90)]

SOFT, HARD = 100, 160
CAP = HARD - FD_RESERVE
# The child lowers its own limit, then runs the console script's main as `vdm-hub` would.
LIMITED = (
    "import resource, runpy; "
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({SOFT}, {HARD})); "
    "runpy.run_module('vdm_hub.services.cli', run_name='__main__')"
)


def _open_stream(host: str, port: int) -> tuple[socket.socket, str]:
    """A raw SSE request; returns the socket (kept open) and the response's header block."""
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(
        b"GET /metrics/active-requests/stream HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream"
        b"\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            break
        head += data
    return sock, head.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()


@pytest.fixture
def streams() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()


def test_past_the_open_file_limit_streams_get_503_and_health_still_answers(
    redis_url: str, key_prefix: str, streams: list[socket.socket]
) -> None:
    env = {"REDIS_URL": redis_url, "VDM_KEY_PREFIX": key_prefix}
    proc = Proc([sys.executable, "-c", LIMITED, "stream", "--port", "0"], env=env, name="stream")
    try:
        url = proc.wait_ready(timeout=30)
        assert f"open-file limit raised from {SOFT} to {HARD}" in proc.output
        assert f"capped at {CAP} (limit {HARD}, {FD_RESERVE} kept" in proc.output
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 0
        for _ in range(CAP):
            sock, head = _open_stream(host, port)
            streams.append(sock)
            assert head.startswith("http/1.1 200"), head
        sock, head = _open_stream(host, port)
        streams.append(sock)
        assert head.startswith("http/1.1 503"), head
        assert "retry-after:" in head
        with httpx.Client(base_url=url, timeout=5) as client:
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 200
            body = client.get("/metrics").text
        assert f"vdm_sse_clients {CAP}.0" in body
    finally:
        for sock in streams:
            sock.close()
        proc.stop()
