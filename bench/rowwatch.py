"""SSE clients that time when a row appears *with its model* and when it is gone again.

Run as a child process (``python -m bench.rowwatch URL N --track K [--delta]``) through
:class:`bench.sseload.SSEPool` (``module="bench.rowwatch"``). Two ways to read a stream:

- *Snapshots* (the default): whole ``event: update`` frames, so it reads any stream that sends
  full snapshots: vandamme-proxy's, and ours without ``delta=1``.
- *Deltas* (``--delta``, with a ``?delta=1`` URL): what our dashboard reads. Every client keeps
  the rows as the dashboard does: an ``update`` replaces them, a ``delta`` must start from the
  version held (else it is counted as a gap), removes its ``remove`` ids and puts its
  ``upsert`` rows.

A probe is identified by its model name, a token the driver chose (the stream of a peer that
makes up its own request ids has nothing else in common with the request). For each watched
token a client stamps (``time.monotonic_ns``) the first frame showing the row with its model,
and then the first frame without it: the row is gone. On snapshots that is bytes work only
(``token in frame``), so one process keeps up with hundreds of streams.

The first ``K`` clients also check each row a frame shows (on deltas: each row it puts): its
``model`` (without a ``provider:`` prefix, which vandamme strips) must be one the driver
announced as sent (``known``). A row with a null, unknown or foreign model is a *violation*: a
frame that shows a request without the model its client sent, or a row that never matched a
request at all.

Commands on stdin, one JSON line each back: ``watch TOKEN``; ``known MODEL``; ``report`` (seen
and gone stamps per token, violations, frames); ``rows`` (models in each tracking client's last
frame); ``close``.
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

from bench.procs import pin

UPDATE = b"event: update"
DELTA = b"event: delta"
DATA = b"data:"
END = b"\n\n"
MAX_BUFFER = 8 << 20


class Pool:
    def __init__(self) -> None:
        self.clients: list[Watcher] = []
        self.seen: dict[bytes, list[int]] = {}
        self.gone: dict[bytes, list[int]] = {}
        self.known: set[str] = set()
        self.violations = 0  # (frame, row) pairs without a known model
        self.violating: set[str] = set()  # distinct request ids among them
        self.examples: list[str] = []
        self.ready = 0
        self.failed = 0
        self.target = 0
        self.ready_event = asyncio.Event()

    def settle(self) -> None:
        if self.ready + self.failed >= self.target:
            self.ready_event.set()


class Watcher(asyncio.Protocol):
    def __init__(self, pool: Pool, request: bytes, track: bool, delta: bool = False) -> None:
        self.pool = pool
        self.request = request
        self.track = track
        self.delta = delta
        # Delta mode: the rows held (request_id -> model) and the version they are at.
        self.rows: dict[str, str | None] = {}
        self.version: int | None = None
        self.gaps = 0
        self.buf = b""
        self.pending: set[bytes] = set()  # watched, not yet seen
        self.showing: set[bytes] = set()  # seen, not yet gone
        self.frames = 0
        self.last_models: list[str | None] = []
        self.ready = False
        self.open = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.open = True
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if not self.ready:
            self.pool.failed += 1
            self.pool.settle()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buf = self.buf + data if self.buf else data
        end = buf.rfind(END)
        if end < 0:
            self.buf = buf if len(buf) < MAX_BUFFER else b""
            return
        self.buf = buf[end + 2 :]
        if self.delta:
            # One send is whole frames, so the HTTP chunk-size lines fall between frames.
            for part in buf[: end + 2].split(END):
                self.delta_frame(part, now)
            return
        start = 0
        while True:
            i = buf.find(UPDATE, start, end + 2)
            if i < 0:
                break
            j = buf.find(END, i)
            self.frame(buf[i:j], now)
            start = j + 2

    def frame(self, frame: bytes, now: int) -> None:
        self.frames += 1
        if not self.ready:
            self.ready = True
            self.pool.ready += 1
            self.pool.settle()
        for tok in [t for t in self.showing if t not in frame]:
            self.showing.discard(tok)
            self.pool.gone[tok].append(now)
        for tok in [t for t in self.pending if t in frame]:
            self.pending.discard(tok)
            self.showing.add(tok)
            self.pool.seen[tok].append(now)
        if self.track:
            self.check(frame)

    def delta_frame(self, part: bytes, now: int) -> None:
        kind = DELTA if DELTA in part else UPDATE if UPDATE in part else None
        at = part.find(DATA)
        if kind is None or at < 0:
            return  # stats, heartbeats, the retry hint
        body = orjson.loads(part[at + len(DATA) :])
        if kind == UPDATE:
            new = {str(r["request_id"]): r.get("model") for r in body.get("active_requests") or []}
            removed = [rid for rid in self.rows if rid not in new]
            upserts = body.get("active_requests") or []
            self.rows = {}
        elif body.get("base") != self.version:
            self.gaps += 1  # a frame that cannot be applied: this view is wrong until an update
            return
        else:
            removed = [str(rid) for rid in body.get("remove") or []]
            upserts = body.get("upsert") or []
        self.version = body.get("version")
        self.frames += 1
        if not self.ready:
            self.ready = True
            self.pool.ready += 1
            self.pool.settle()
        for rid in removed:
            model = self.rows.pop(rid, None)
            tok = model.encode() if isinstance(model, str) else None
            if tok is not None and tok in self.showing:
                self.showing.discard(tok)
                self.pool.gone[tok].append(now)
        for row in upserts:
            model = row.get("model")
            self.rows[str(row["request_id"])] = model if isinstance(model, str) else None
            tok = model.encode() if isinstance(model, str) else None
            if tok is not None and tok in self.pending:
                self.pending.discard(tok)
                self.showing.add(tok)
                self.pool.seen[tok].append(now)
        if self.track:
            self.check_rows(upserts)
            self.last_models = list(self.rows.values())

    def check(self, frame: bytes) -> None:
        start = frame.find(b"data:")
        try:
            body = orjson.loads(frame[start + 5 :])
            rows = body.get("active_requests") or []
        except (orjson.JSONDecodeError, AttributeError):
            return
        self.last_models = self.check_rows(rows)

    def check_rows(self, rows: list[Any]) -> list[str | None]:
        """Count the rows shown without a model their client sent; their models."""
        models: list[str | None] = []
        for row in rows:
            model = row.get("model") if isinstance(row, dict) else None
            models.append(model if isinstance(model, str) else None)
            bare = model.split(":", 1)[-1] if isinstance(model, str) else None
            if bare not in self.pool.known:
                self.pool.violations += 1
                rid = str(row.get("request_id")) if isinstance(row, dict) else "?"
                if rid not in self.pool.violating and len(self.pool.examples) < 5:
                    self.pool.examples.append(f"{rid} model={model!r}")
                self.pool.violating.add(rid)
        return models


async def serve(url: str, n: int, track: int, delta: bool) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    pool = Pool()
    pool.target = n
    sem = asyncio.Semaphore(100)

    async def one(i: int) -> None:
        async with sem:
            try:
                _, client = await loop.create_connection(
                    lambda: Watcher(pool, request, i < track, delta), host, port
                )
            except OSError:
                pool.failed += 1
                pool.settle()
                return
            pool.clients.append(client)

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer

    def reply(obj: Any) -> None:
        out.write(orjson.dumps(obj) + b"\n")
        out.flush()

    await asyncio.gather(*(one(i) for i in range(n)))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(60):
            await pool.ready_event.wait()
    reply({"ready": pool.ready, "failed": pool.failed})
    while line := await reader.readline():
        cmd, _, arg = line.strip().partition(b" ")
        if cmd == b"watch":
            pool.seen.setdefault(arg, [])
            pool.gone.setdefault(arg, [])
            pool.known.add(arg.decode())
            for c in pool.clients:
                c.pending.add(arg)
            reply("ok")
        elif cmd == b"known":
            pool.known.add(arg.decode())
            reply("ok")
        elif cmd == b"report":
            reply(
                {
                    "seen": {k.decode(): v for k, v in pool.seen.items()},
                    "gone": {k.decode(): v for k, v in pool.gone.items()},
                    "violations": pool.violations,
                    "violating": len(pool.violating),
                    "examples": pool.examples,
                    "frames_min": min((c.frames for c in pool.clients), default=0),
                    "gaps": sum(c.gaps for c in pool.clients),
                    "open": sum(1 for c in pool.clients if c.open),
                }
            )
        elif cmd == b"rows":
            reply([c.last_models for c in pool.clients if c.track])
        elif cmd == b"close":
            break
    for c in pool.clients:
        if c.transport is not None:
            c.transport.abort()
    reply("closed")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rowwatch")
    parser.add_argument("url")
    parser.add_argument("clients", type=int)
    parser.add_argument("--track", type=int, default=2, help="clients that parse every frame")
    parser.add_argument("--delta", action="store_true", help="read ?delta=1 streams")
    parser.add_argument("--cpus", default="")
    args = parser.parse_args(argv)
    if args.cpus:
        pin(os.getpid(), [int(c) for c in args.cpus.split(",")])
    import uvloop

    uvloop.run(serve(args.url, args.clients, args.track, args.delta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
