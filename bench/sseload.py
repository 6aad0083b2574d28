"""A light SSE client load: many raw-socket clients per process, no per-event JSON parsing.

Run as a child process (``python -m bench.sseload URL N``) by :class:`SSEPool`; what its
clients share with the other client programs is in :mod:`bench.sseclients`. Each client only
looks at the bytes it receives: ``token in data`` for the few tokens the driver is waiting
for, a count of ``event: update``, and the bytes of the last update (kept for the final-state
check). That is all C-level ``bytes`` work, so one process keeps up with thousands of
streams; the driver measures this process's CPU to show it is not the bottleneck.

Control is line-based on stdin/stdout (a handful of lines per change, never per event):
``watch TOKEN`` -> ``ok``; ``forget`` -> ``ok`` (stop waiting for tokens);
``has TOKEN`` -> JSON count of clients whose last update lacks TOKEN;
``final TOKEN ROWS`` -> JSON count of clients whose last update holds TOKEN and ROWS rows;
``bytes`` -> JSON of the bytes received by all clients so far;
``report`` -> JSON of every token's arrival times (``time.monotonic_ns``: CLOCK_MONOTONIC, the
same clock in every process on the machine); ``close``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.procs import CommandProcess
from bench.sseclients import (
    ClientPool,
    StreamClient,
    client_parser,
    run_clients,
    unknown,
)

TAIL = 128  # bytes kept from the previous chunk, so a token cut in two is still found
MAX_LAST = 4 << 20
UPDATE = b"event: update"
ROW_KEY = b'"request_id"'


class Pool(ClientPool["SSEClient"]):
    """Shared state of the clients in one process."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[bytes, list[int]] = {}
        self.keep_last = True  # off with --count-only: thousands of large snapshots add up


class SSEClient(StreamClient):
    def __init__(self, pool: Pool, request: bytes) -> None:
        super().__init__(pool, request)
        self.pool: Pool = pool
        self.pending: dict[bytes, None] = {}
        self.tail = b""
        self.updates = 0
        self.last: list[bytes] = []
        self.last_len = 0
        self.bytes = 0

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
            self.became_ready()
        elif self.pool.keep_last and self.last and self.last_len < MAX_LAST:
            self.last.append(data)
            self.last_len += len(data)

    def last_update(self) -> bytes:
        frame = b"".join(self.last)
        end = frame.find(b"\n\n")
        return frame if end < 0 else frame[:end]


def answer(pool: Pool, cmd: bytes, arg: bytes) -> Any:
    """The reply to one command line (see the module docstring)."""
    if cmd == b"watch":
        pool.seen.setdefault(arg, [])
        for client in pool.clients:
            client.pending[arg] = None
        return b"ok"
    if cmd == b"forget":
        for client in pool.clients:
            client.pending.clear()
        return b"ok"
    if cmd == b"final":
        token, _, rows = arg.partition(b" ")
        want = int(rows)
        good = 0
        for client in pool.clients:
            last = client.last_update()
            if token in last and last.count(ROW_KEY) == want:
                good += 1
        return {"good": good, "clients": len(pool.clients)}
    if cmd == b"has":
        missing = sum(1 for c in pool.clients if arg not in c.last_update())
        return {"missing": missing + pool.target - len(pool.clients)}
    if cmd == b"report":
        updates = sorted(c.updates for c in pool.clients)
        report = {
            "seen": {k.decode(): v for k, v in pool.seen.items()},
            "open": sum(1 for c in pool.clients if c.open),
            "updates_min": updates[0] if updates else 0,
        }
        pool.seen = {k: [] for k in pool.seen}
        return report
    if cmd == b"bytes":
        return {
            "bytes": sum(c.bytes for c in pool.clients),
            "clients": len(pool.clients),
            "open": sum(1 for c in pool.clients if c.open),
        }
    return unknown(cmd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = client_parser("bench.sseload")
    parser.add_argument("--count-only", action="store_true", help="keep no frame, count bytes")
    args = parser.parse_args(argv)
    pool = Pool()
    pool.keep_last = not args.count_only
    return run_clients(
        args, pool, lambda i, req: SSEClient(pool, req), lambda cmd, arg: answer(pool, cmd, arg)
    )


# ------------------------------------------------------------------------------ driver side


class SSEPool:
    """The driver's handle on ``procs`` client processes sharing ``clients`` streams."""

    def __init__(self) -> None:
        self.procs: list[CommandProcess] = []
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
            proc = CommandProcess("SSE client")
            self.procs.append(proc)
            await proc.spawn(module, url, str(share), *args, "--cpus", cpu_arg)
        for answer in await self._read_all(timeout=90):
            self.ready += answer["ready"]
            self.failed += answer["failed"]
        return self

    async def _read_all(self, timeout: float = 30) -> list[Any]:
        async with asyncio.timeout(timeout):
            return list(await asyncio.gather(*(p.answer() for p in self.procs)))

    async def command(self, line: str, timeout: float = 30) -> list[Any]:
        for proc in self.procs:
            proc.send(line)
        for proc in self.procs:
            await proc.drain()
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
        await asyncio.gather(*(p.close() for p in self.procs))
        self.procs.clear()


if __name__ == "__main__":
    sys.exit(main())
