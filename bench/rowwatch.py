"""SSE clients that time when a row appears *with its model* and when it is gone again.

Run as a child process (``python -m bench.rowwatch URL N --track K [--delta]``) through
:class:`bench.sseload.SSEPool` (``module="bench.rowwatch"``; the clients' connection and the
command loop are :mod:`bench.sseclients`). Two ways to read a stream:

- *Snapshots* (the default): whole ``event: update`` frames, so it reads any stream that sends
  full snapshots: vandamme-proxy's, and ours without ``delta=1``.
- *Deltas* (``--delta``, with a ``?delta=1`` URL): what our dashboard reads. Every client keeps
  the rows as the dashboard does: an ``update`` replaces them, a ``delta`` must start from the
  version held (else it is counted as a gap), removes the rows its ``remove`` names and puts
  its ``upsert`` rows, both by the row's ``key`` (a request id is unique per worker only).

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

import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson

from bench.sseclients import (
    ClientPool,
    StreamClient,
    client_parser,
    run_clients,
    unknown,
)

UPDATE = b"event: update"
DELTA = b"event: delta"
DATA = b"data:"
END = b"\n\n"
MAX_BUFFER = 8 << 20


class Pool(ClientPool["Watcher"]):
    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[bytes, list[int]] = {}
        self.gone: dict[bytes, list[int]] = {}
        self.known: set[str] = set()
        self.violations = 0  # (frame, row) pairs without a known model
        self.violating: set[str] = set()  # distinct request ids among them
        self.examples: list[str] = []


class Watcher(StreamClient):
    def __init__(self, pool: Pool, request: bytes, track: bool, delta: bool = False) -> None:
        super().__init__(pool, request)
        self.pool: Pool = pool
        self.track = track
        self.delta = delta
        # Delta mode: the rows held (row key -> model) and the version they are at.
        self.rows: dict[str, str | None] = {}
        self.version: int | None = None
        self.gaps = 0
        self.buf = b""
        self.pending: set[bytes] = set()  # watched, not yet seen
        self.showing: set[bytes] = set()  # seen, not yet gone
        self.frames = 0
        self.last_models: list[str | None] = []

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
        self.became_ready()
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
            upserts = body.get("active_requests") or []
            kept = {str(r["key"]) for r in upserts}
            removed = [key for key in self.rows if key not in kept]
        elif body.get("base") != self.version:
            self.gaps += 1  # a frame that cannot be applied: this view is wrong until an update
            return
        else:
            removed = [str(key) for key in body.get("remove") or []]
            upserts = body.get("upsert") or []
        self.version = body.get("version")
        self.frames += 1
        self.became_ready()
        for key in removed:
            model = self.rows.pop(key, None)
            tok = model.encode() if isinstance(model, str) else None
            if tok is not None and tok in self.showing:
                self.showing.discard(tok)
                self.pool.gone[tok].append(now)
        for row in upserts:
            model = row.get("model")
            self.rows[str(row["key"])] = model if isinstance(model, str) else None
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


def answer(pool: Pool, cmd: bytes, arg: bytes) -> Any:
    """The reply to one command line (see the module docstring)."""
    if cmd == b"watch":
        pool.seen.setdefault(arg, [])
        pool.gone.setdefault(arg, [])
        pool.known.add(arg.decode())
        for c in pool.clients:
            c.pending.add(arg)
        return "ok"
    if cmd == b"known":
        pool.known.add(arg.decode())
        return "ok"
    if cmd == b"report":
        return {
            "seen": {k.decode(): v for k, v in pool.seen.items()},
            "gone": {k.decode(): v for k, v in pool.gone.items()},
            "violations": pool.violations,
            "violating": len(pool.violating),
            "examples": pool.examples,
            "frames_min": min((c.frames for c in pool.clients), default=0),
            "open": sum(1 for c in pool.clients if c.open),
            "gaps": sum(c.gaps for c in pool.clients),
        }
    if cmd == b"rows":
        return [c.last_models for c in pool.clients if c.track]
    return unknown(cmd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = client_parser("bench.rowwatch")
    parser.add_argument("--track", type=int, default=2, help="clients that parse every frame")
    parser.add_argument("--delta", action="store_true", help="read ?delta=1 streams")
    args = parser.parse_args(argv)
    pool = Pool()
    return run_clients(
        args,
        pool,
        lambda i, req: Watcher(pool, req, track=i < args.track, delta=args.delta),
        lambda cmd, arg: answer(pool, cmd, arg),
    )


if __name__ == "__main__":
    sys.exit(main())
