"""A light SSE client load: many raw-socket clients per process, no per-event JSON parsing.

Run as a child process (``python -m bench.sseload URL N``) by :class:`SSEPool`. Each client is
an ``asyncio.Protocol`` on a plain TCP socket that sends one ``GET`` and then only looks at
the bytes it receives: ``token in data`` for the few tokens the driver is waiting for, a count
of ``event: update``, and the bytes of the last update (kept for the final-state check). That
is all C-level ``bytes`` work, so one process keeps up with thousands of streams; the driver
measures this process's CPU to show it is not the bottleneck.

Control is line-based on stdin/stdout (a handful of lines per change, never per event):
``watch TOKEN`` -> ``ok``; ``forget`` -> ``ok`` (stop waiting for tokens);
``has TOKEN`` -> JSON count of clients whose last update lacks TOKEN;
``final TOKEN ROWS`` -> JSON count of clients whose last update holds TOKEN and ROWS rows;
``bytes`` -> JSON of the bytes received by all clients so far;
``report`` -> JSON of every token's arrival times (``time.monotonic_ns``: CLOCK_MONOTONIC, the
same clock in every process on the machine); ``close``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import orjson

from bench.procs import ROOT, pin

TAIL = 128  # bytes kept from the previous chunk, so a token cut in two is still found
MAX_LAST = 4 << 20
UPDATE = b"event: update"
ROW_KEY = b'"request_id"'


class Pool:
    """Shared state of the clients in one process."""

    def __init__(self) -> None:
        self.clients: list[SSEClient] = []
        self.seen: dict[bytes, list[int]] = {}
        self.ready = 0
        self.failed = 0
        self.ready_event = asyncio.Event()
        self.target = 0
        self.keep_last = True  # off with --count-only: thousands of large snapshots add up

    def mark_ready(self) -> None:
        self.ready += 1
        if self.ready + self.failed >= self.target:
            self.ready_event.set()

    def mark_failed(self) -> None:
        self.failed += 1
        if self.ready + self.failed >= self.target:
            self.ready_event.set()


class SSEClient(asyncio.Protocol):
    def __init__(self, pool: Pool, request: bytes) -> None:
        self.pool = pool
        self.request = request
        self.pending: dict[bytes, None] = {}
        self.tail = b""
        self.updates = 0
        self.last: list[bytes] = []
        self.last_len = 0
        self.ready = False
        self.closed = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        self.bytes += len(data)
        if self.pending:
            buf = self.tail + data
            found = [tok for tok in self.pending if tok in buf]
            for tok in found:
                del self.pending[tok]
                self.pool.seen[tok].append(now)
        self.tail = data[-TAIL:]
        n = data.count(UPDATE)
        if n:
            self.updates += n
            i = data.rfind(UPDATE)
            if self.pool.keep_last:
                self.last = [data[i:]]
                self.last_len = len(data) - i
            if not self.ready:
                self.ready = True
                self.pool.mark_ready()
        elif self.pool.keep_last and self.last and self.last_len < MAX_LAST:
            self.last.append(data)
            self.last_len += len(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready:
            self.pool.mark_failed()
        if not self.closed.done():
            self.closed.set_result(None)

    def last_update(self) -> bytes:
        frame = b"".join(self.last)
        end = frame.find(b"\n\n")
        return frame if end < 0 else frame[:end]


async def connect_all(pool: Pool, url: str, n: int, parallel: int = 100) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(parallel)
    pool.target = n

    async def one() -> None:
        async with sem:
            try:
                _, client = await loop.create_connection(
                    lambda: SSEClient(pool, request), host, port
                )
            except OSError:
                pool.mark_failed()
                return
            pool.clients.append(client)

    await asyncio.gather(*(one() for _ in range(n)))


async def serve_commands(pool: Pool, url: str, n: int) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer

    def reply(obj: Any) -> None:
        out.write(obj if isinstance(obj, bytes) else orjson.dumps(obj))
        out.write(b"\n")
        out.flush()

    await connect_all(pool, url, n)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(60):
            await pool.ready_event.wait()
    reply({"ready": pool.ready, "failed": pool.failed})
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd, _, arg = line.strip().partition(b" ")
        if cmd == b"watch":
            pool.seen.setdefault(arg, [])
            for client in pool.clients:
                client.pending[arg] = None
            reply(b"ok")
        elif cmd == b"forget":
            for client in pool.clients:
                client.pending.clear()
            reply(b"ok")
        elif cmd == b"final":
            token, _, rows = arg.partition(b" ")
            want = int(rows)
            good = 0
            for client in pool.clients:
                last = client.last_update()
                if token in last and last.count(ROW_KEY) == want:
                    good += 1
            reply({"good": good, "clients": len(pool.clients)})
        elif cmd == b"has":
            missing = sum(1 for c in pool.clients if arg not in c.last_update())
            reply({"missing": missing + pool.target - len(pool.clients)})
        elif cmd == b"report":
            open_ = sum(1 for c in pool.clients if not c.closed.done())
            updates = sorted(c.updates for c in pool.clients)
            reply(
                {
                    "seen": {k.decode(): v for k, v in pool.seen.items()},
                    "open": open_,
                    "updates_min": updates[0] if updates else 0,
                }
            )
            pool.seen = {k: [] for k in pool.seen}
        elif cmd == b"bytes":
            reply(
                {
                    "bytes": sum(c.bytes for c in pool.clients),
                    "clients": len(pool.clients),
                    "open": sum(1 for c in pool.clients if not c.closed.done()),
                }
            )
        elif cmd == b"close":
            break
    for client in pool.clients:
        if client.transport is not None:
            client.transport.abort()
    reply(b"closed")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sseload")
    parser.add_argument("url")
    parser.add_argument("clients", type=int)
    parser.add_argument("--cpus", default="", help="comma-separated CPUs to pin to")
    parser.add_argument("--count-only", action="store_true", help="keep no frame, count bytes")
    args = parser.parse_args(argv)
    if args.cpus:
        pin(os.getpid(), [int(c) for c in args.cpus.split(",")])
    import uvloop  # ships with uvicorn[standard]

    pool = Pool()
    pool.keep_last = not args.count_only
    uvloop.run(serve_commands(pool, args.url, args.clients))
    return 0


# ------------------------------------------------------------------------------ driver side


class SSEPool:
    """The driver's handle on ``procs`` client processes sharing ``clients`` streams."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []
        self.ready = 0
        self.failed = 0

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def start(
        self,
        url: str,
        clients: int,
        *,
        procs: int = 1,
        cpus: Sequence[int] | None = None,
        module: str = "bench.sseload",
        args: Sequence[str] = (),
    ) -> SSEPool:
        """``module`` is the client program (this one, or another speaking its protocol)."""
        procs = max(1, min(procs, clients))
        shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
        cpu_arg = ",".join(str(c) for c in cpus) if cpus else ""
        for share in shares:
            self.procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    module,
                    url,
                    str(share),
                    *args,
                    "--cpus",
                    cpu_arg,
                    cwd=ROOT,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    limit=64 << 20,
                )
            )
        for answer in await self._read_all(timeout=90):
            self.ready += answer["ready"]
            self.failed += answer["failed"]
        return self

    async def _read_all(self, timeout: float = 30) -> list[Any]:
        async def one(proc: asyncio.subprocess.Process) -> Any:
            assert proc.stdout is not None
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError("an SSE client process exited")
            return orjson.loads(line) if line[:1] in b"{[" else line.strip().decode()

        async with asyncio.timeout(timeout):
            return list(await asyncio.gather(*(one(p) for p in self.procs)))

    async def command(self, line: str, timeout: float = 30) -> list[Any]:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(line.encode() + b"\n")
        for proc in self.procs:
            assert proc.stdin is not None
            await proc.stdin.drain()
        return await self._read_all(timeout)

    async def watch(self, token: str) -> None:
        await self.command(f"watch {token}")

    async def forget(self) -> None:
        await self.command("forget")

    async def final(self, token: str, rows: int) -> int:
        return sum(a["good"] for a in await self.command(f"final {token} {rows}"))

    async def report(self) -> dict[str, Any]:
        seen: dict[str, list[int]] = {}
        open_ = 0
        updates_min: int | None = None
        for answer in await self.command("report", timeout=60):
            for token, times in answer["seen"].items():
                seen.setdefault(token, []).extend(times)
            open_ += answer["open"]
            m = answer["updates_min"]
            updates_min = m if updates_min is None else min(updates_min, m)
        return {"seen": seen, "open": open_, "updates_min": updates_min or 0}

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.command("close", timeout=15)
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 5)
        self.procs.clear()


if __name__ == "__main__":
    sys.exit(main())
