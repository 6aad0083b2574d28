"""What every SSE client process of the benchmarks shares: raw-socket clients, their pool, and
the line protocol with the driver (:class:`bench.sseload.SSEPool`).

A client process (``python -m bench.sseload|rowwatch|viewclient URL N [options] --cpus C``)
opens ``N`` plain TCP connections, each an ``asyncio.Protocol`` that sends one ``GET`` and
reads the stream itself (no HTTP library: one process keeps up with thousands of streams). A
client is *ready* at its first frame, *failed* if it could not connect or lost the connection
before that. Once all are one or the other (at most 60 s), the process writes
``{"ready": R, "failed": F}``; then it answers one line per command line on stdin until
``close`` (or end of input), aborts every connection and writes ``closed``. What the clients
look at in the bytes, and the commands, are each program's own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar, cast
from urllib.parse import urlsplit

import orjson

from bench.procs import run_pinned

C = TypeVar("C", bound="StreamClient")
READY_TIMEOUT = 60.0


class ClientPool(Generic[C]):
    """The clients of one process and how many of them are ready or failed."""

    def __init__(self) -> None:
        self.clients: list[C] = []
        self.ready = 0
        self.failed = 0
        self.target = 0
        self.ready_event = asyncio.Event()

    def mark_ready(self) -> None:
        self.ready += 1
        self._settle()

    def mark_failed(self) -> None:
        self.failed += 1
        self._settle()

    def _settle(self) -> None:
        if self.ready + self.failed >= self.target:
            self.ready_event.set()

    def abort_all(self) -> None:
        for client in self.clients:
            if client.transport is not None:
                client.transport.abort()


class StreamClient(asyncio.Protocol):
    """One connection: sends ``request`` once connected; ``became_ready`` at its first frame."""

    def __init__(self, pool: ClientPool[Any], request: bytes) -> None:
        self.pool = pool
        self.request = request
        self.ready = False
        self.open = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.open = True
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if not self.ready:
            self.pool.mark_failed()

    def became_ready(self) -> None:
        if not self.ready:
            self.ready = True
            self.pool.mark_ready()


def stream_request(url: str) -> tuple[str, int, bytes]:
    """(host, port, the bytes of the ``GET`` for ``url``'s event stream)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n"
    return host, port, request.encode()


async def connect_all(
    pool: ClientPool[C],
    url: str,
    n: int,
    make: Callable[[int, bytes], C],
    parallel: int = 100,
) -> None:
    """Connect ``n`` clients (``make(index, request)``), ``parallel`` at a time, in index order."""
    host, port, request = stream_request(url)
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(parallel)
    pool.target = n

    async def one(i: int) -> C | None:
        async with sem:
            try:
                _, client = await loop.create_connection(lambda: make(i, request), host, port)
            except OSError:
                pool.mark_failed()
                return None
            return client

    connected = await asyncio.gather(*(one(i) for i in range(n)))
    pool.clients.extend(c for c in connected if c is not None)


Handler = Callable[[bytes, bytes], Any]  # (command, argument) -> the answer


async def serve_commands(pool: ClientPool[C], connect: Awaitable[None], handle: Handler) -> None:
    """Connect, report readiness, answer commands until ``close``; see the module docstring.

    An answer that is ``bytes`` is written as it is, anything else as JSON.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer

    def reply(obj: Any) -> None:
        out.write(obj if isinstance(obj, bytes) else orjson.dumps(obj))
        out.write(b"\n")
        out.flush()

    await connect
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(READY_TIMEOUT):
            await pool.ready_event.wait()
    reply({"ready": pool.ready, "failed": pool.failed})
    while line := await reader.readline():
        cmd, _, arg = line.strip().partition(b" ")
        if cmd == b"close":
            break
        reply(handle(cmd, arg))
    pool.abort_all()
    reply(b"closed")


def client_parser(prog: str) -> argparse.ArgumentParser:
    """``URL N`` and ``--cpus``: what :class:`bench.sseload.SSEPool` passes every program."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}")
    parser.add_argument("url")
    parser.add_argument("clients", type=int)
    parser.add_argument("--cpus", default="", help="comma-separated CPUs to pin to")
    return parser


def run_clients(
    args: argparse.Namespace, pool: ClientPool[C], make: Callable[[int, bytes], C], handle: Handler
) -> int:
    """A client program's body: ``args.clients`` clients of ``make`` on ``args.url``, then the
    command loop, pinned as ``--cpus`` says (see :func:`client_parser`)."""

    async def main() -> None:
        await serve_commands(pool, connect_all(pool, args.url, args.clients, make), handle)

    return run_pinned(args.cpus, main)


def unknown(cmd: bytes) -> dict[str, str]:
    return {"error": f"unknown command {cmd.decode(errors='replace')!r}"}
