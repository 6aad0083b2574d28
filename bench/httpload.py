"""A lean closed-loop HTTP/1.1 load client: raw keep-alive sockets, one process of its own.

``wrk`` would do as well (Debian packages it), but the proxies under test top out at a few
thousand requests per second on this machine, which a uvloop client on raw sockets drives
with CPU to spare; the driver measures this process's CPU to show that, and the benchmark
needs nothing beyond the Python environment.

Run as ``python -m bench.httpload`` by :class:`HTTPLoad`; stdin takes
``run URL CONCURRENCY SECONDS [stream]`` and answers one JSON line: requests, errors (and
``failures``: their statuses, ``lost`` for a closed connection), elapsed seconds and latency
percentiles (ms). Every request is the same small chat completion that the
demo upstream answers at once (``x-demo-delay-ms: 0``): non-streaming, or with ``stream`` a
streaming one (an SSE response read to its last chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import orjson

from bench.procs import CommandProcess, run_pinned
from bench.report import percentile

BODY = orjson.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
)
STREAM_BODY = orjson.dumps({**orjson.loads(BODY), "stream": True})


def build_request(
    host: str, port: int, path: str, headers: dict[str, str] | None = None, stream: bool = False
) -> bytes:
    extra = {"x-demo-delay-ms": "0", "x-demo-chunks": "8", **(headers or {})}
    lines = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
    body = STREAM_BODY if stream else BODY
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{lines}\r\n"
    ).encode() + body


class Conn(asyncio.Protocol):
    """One keep-alive connection; ``request()`` sends and waits for the whole response."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.done: asyncio.Future[bool] | None = None
        self.lost = False
        self.status = ""  # of the last complete response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.done is not None and not self.done.done():
            self.done.set_result(False)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0 or self.done is None or self.done.done():
            return
        length = -1
        for line in self.buf[:head_end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length >= 0:
            if len(self.buf) - head_end - 4 < length:
                return
        elif not self.buf.endswith(b"0\r\n\r\n"):
            return  # chunked: wait for the last chunk
        ok = self.buf.startswith(b"HTTP/1.1 200")
        self.status = self.buf[9:12].decode(errors="replace")
        self.buf = b""
        self.done.set_result(ok)

    def send(self, request: bytes | None = None) -> asyncio.Future[bool]:
        """Write the request now; the future says whether a 200 came back in full."""
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request or self.request)
        return self.done

    async def roundtrip(self) -> bool:
        return await self.send()


async def connect(url: str, request: bytes = b"") -> Conn:
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(
        lambda: Conn(request), parts.hostname or "127.0.0.1", parts.port or 80
    )
    return conn


async def run_load(
    url: str, concurrency: int, seconds: float, stream: bool = False
) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = build_request(host, port, parts.path or "/v1/chat/completions", stream=stream)
    loop = asyncio.get_running_loop()
    conns: list[Conn] = []
    for _ in range(concurrency):
        _, conn = await loop.create_connection(lambda: Conn(request), host, port)
        conns.append(conn)
    for conn in conns:  # warm each connection (and the proxy's pool to the upstream)
        await conn.roundtrip()
    latencies: list[int] = []
    errors = 0
    failures: dict[str, int] = {}  # non-200 status (or "lost": the connection closed) -> count
    stop_at = time.monotonic() + seconds

    async def worker(conn: Conn) -> None:
        nonlocal errors
        while time.monotonic() < stop_at and not conn.lost:
            t0 = time.monotonic_ns()
            ok = await conn.roundtrip()
            latencies.append(time.monotonic_ns() - t0)
            if not ok:
                errors += 1
                why = "lost" if conn.lost else conn.status
                failures[why] = failures.get(why, 0) + 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.monotonic() - t0
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    ms = sorted(x / 1e6 for x in latencies)
    return {
        "requests": len(ms),
        "errors": errors,
        "failures": failures,
        "elapsed": elapsed,
        "rps": len(ms) / elapsed if elapsed > 0 else 0.0,
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
    }


async def serve_commands() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    while line := await reader.readline():
        words = line.decode().split()
        if words[:1] == ["run"]:
            stream = words[4:5] == ["stream"]
            result = await run_load(words[1], int(words[2]), float(words[3]), stream)
            out.write(orjson.dumps(result) + b"\n")
            out.flush()
        elif words[:1] == ["close"]:
            break


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.httpload")
    parser.add_argument("--cpus", default="")
    return run_pinned(parser.parse_args(argv).cpus, serve_commands)


class HTTPLoad(CommandProcess):
    """The driver's handle on one load-client process."""

    def __init__(self) -> None:
        super().__init__("HTTP load")

    async def start(self, cpus: Sequence[int] | None = None) -> HTTPLoad:
        await self.spawn("bench.httpload", "--cpus", ",".join(str(c) for c in cpus or ()))
        return self

    async def run(
        self, url: str, concurrency: int, seconds: float, stream: bool = False
    ) -> dict[str, Any]:
        line = f"run {url} {concurrency} {seconds}" + (" stream" if stream else "")
        result: dict[str, Any] = await self.command(line, timeout=seconds + 60)
        return result


if __name__ == "__main__":
    sys.exit(main())
