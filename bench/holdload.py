"""Many long requests held in flight at once, with the exact set in flight as the truth.

Run as a child process (``python -m bench.holdload``) by :class:`HoldLoad`. ``start`` opens
``conns`` keep-alive connections (round robin over the targets, at most ``rate`` new ones per
second), and each sends one request after another: a chat completion that the demo upstream
holds a random ``hold`` seconds (``x-demo-delay-ms``), every second one streaming. Every request
has an id of its own, sent as ``X-Request-Id`` and as its model name, so a row can be matched to
it whatever request id the worker gives it. A request is *in flight* from the moment it is
written until the last byte of its response has arrived: that set is the truth a view is
compared with.

Raw sockets on uvloop: no client-side pool, so nothing queues here (the first write of a
request happens as soon as its connection is open, and ``queued_ms`` reports the connect
time). Commands on stdin, one JSON line back each: ``start`` (parameters as JSON), ``sample``
(ids in flight now), ``stop`` (no new requests; wait for those in flight), ``report``,
``close``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson

from bench.httpload import Conn
from bench.procs import CommandProcess, run_pinned


def request_bytes(host: str, port: int, rid: str, hold_ms: int, stream: bool) -> bytes:
    body = orjson.dumps(
        {
            "model": rid,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "stream": stream,
        }
    )
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"X-Request-Id: {rid}\r\nX-Demo-Delay-Ms: {hold_ms}\r\nX-Demo-Chunks: 4\r\n"
        f"X-Demo-Chunk-Delay-Ms: 0\r\n\r\n"
    ).encode() + body


class Load:
    def __init__(self) -> None:
        self.in_flight: dict[str, int] = {}  # id -> sent ns
        self.target_of: dict[str, int] = {}  # id -> target index
        self.sent: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.errors = 0
        self.reasons: dict[str, int] = {}
        self.connect_errors = 0
        self.connect_ms: list[float] = []
        self.stopping = False
        self.tasks: list[asyncio.Task[None]] = []
        self.n = 0

    async def run_conn(
        self, idx: int, host: str, port: int, target: int, params: dict[str, Any]
    ) -> None:
        rng = random.Random(idx)
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        try:
            _, conn = await loop.create_connection(lambda: Conn(b""), host, port)
        except OSError:
            self.connect_errors += 1
            return
        self.connect_ms.append((time.monotonic() - t0) * 1000)
        low, high = params["hold"]
        try:
            while not self.stopping and not conn.lost:
                self.n += 1
                rid = f"{params['run']}-{self.n:07d}z"
                hold = int(rng.uniform(low, high) * 1000)
                req = request_bytes(host, port, rid, hold, self.n % 2 == 0)
                self.in_flight[rid] = self.sent[rid] = time.monotonic_ns()
                self.target_of[rid] = target
                ok = await conn.send(req)
                self.done[rid] = time.monotonic_ns()
                del self.in_flight[rid]
                if not ok:
                    self.errors += 1
                    why = "connection lost" if conn.lost else f"HTTP {conn.status}"
                    self.reasons[why] = self.reasons.get(why, 0) + 1
        finally:
            if conn.transport is not None:
                conn.transport.close()

    async def start(self, params: dict[str, Any]) -> None:
        targets = [tuple(t) for t in params["targets"]]
        rate = float(params["rate"])
        for i in range(int(params["conns"])):
            host, port = targets[i % len(targets)]
            self.tasks.append(
                asyncio.create_task(
                    self.run_conn(i, str(host), int(port), i % len(targets), params)
                )
            )
            await asyncio.sleep(1 / rate)

    async def stop(self, timeout: float) -> None:
        self.stopping = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*self.tasks, return_exceptions=True)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    load = Load()
    starter: asyncio.Task[None] | None = None

    def reply(obj: Any) -> None:
        out.write(orjson.dumps(obj) + b"\n")
        out.flush()

    while line := await reader.readline():
        cmd, _, arg = line.strip().partition(b" ")
        if cmd == b"start":
            starter = asyncio.create_task(load.start(orjson.loads(arg)))
            reply("ok")
        elif cmd == b"sample":
            per_target: dict[int, int] = {}
            for rid in load.in_flight:
                t = load.target_of[rid]
                per_target[t] = per_target.get(t, 0) + 1
            reply(
                {
                    "ids": load.in_flight,
                    "per_target": {str(k): v for k, v in per_target.items()},
                    "t": time.monotonic_ns(),
                }
            )
        elif cmd == b"stop":
            if starter is not None:
                starter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starter
            await load.stop(float(arg or 60))
            reply("ok")
        elif cmd == b"report":
            ms = sorted(load.connect_ms)
            reply(
                {
                    "sent": load.sent,
                    "done": load.done,
                    "errors": load.errors,
                    "reasons": load.reasons,
                    "connect_errors": load.connect_errors,
                    "connect_ms_max": ms[-1] if ms else 0.0,
                }
            )
        elif cmd == b"close":
            break
    reply("closed")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.holdload")
    parser.add_argument("--cpus", default="")
    return run_pinned(parser.parse_args(argv).cpus, serve)


class HoldLoad(CommandProcess):
    """The driver's handle on the load process."""

    def __init__(self) -> None:
        super().__init__("hold-load")

    async def open(self) -> HoldLoad:
        await self.spawn("bench.holdload", limit=256 << 20)  # ``sample`` lists every id
        return self


if __name__ == "__main__":
    sys.exit(main())
