"""A stream client that keeps the whole view, as the dashboard does, and says what it holds.

Run as a child process (``python -m bench.viewclient URL N``) through
:class:`bench.sseload.SSEPool` (``module="bench.viewclient"``; the clients' connection and the
command loop are :mod:`bench.sseclients`). Each of its ``N`` clients
decodes the HTTP chunked body, parses every frame and applies it: an ``update`` replaces the
state; a ``delta`` (``?delta=1``) must have ``base`` equal to the version held, then the rows
its ``remove`` names go and its ``upsert`` rows replace theirs, both by the row's ``key`` (the
stream's fleet-wide name of a row: a request id is unique per worker only). A delta whose base
is not the version held is a *gap* (counted; the client then waits for the next ``update``).

What the driver tracks a row by (its *token*) is its model when the model is one of the run's
tokens (``--prefix``; the driver gives every request a model of its own, which survives a
worker choosing its own request ids), else its ``request_id``. Per token the first client
stamps when it first appeared, and when it was gone (``time.monotonic_ns``); a worker that
leaves the ``workers`` list is counted as lost.

Commands on stdin (one JSON line back each): ``sample`` (the tokens the first client holds now
as ``keys``, its version); ``report`` (stamps, counters, every client's state digest);
``close``.
"""

from __future__ import annotations

import hashlib
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


class Shared(ClientPool["View"]):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.first: dict[str, int] = {}
        self.gone: dict[str, int] = {}


class View(StreamClient):
    def __init__(self, shared: Shared, request: bytes, stamps: bool) -> None:
        super().__init__(shared, request)
        self.shared = shared
        self.stamps = stamps  # the first client stamps appearances and removals
        self.raw = b""
        self.head_done = False
        self.chunk_left = 0  # body bytes left in the current HTTP chunk
        self.skip_crlf = False  # the CRLF that ends a chunk is due
        self.body = b""
        self.rows: dict[str, dict[str, Any]] = {}  # row key -> row
        self.keys: dict[str, str] = {}  # row key -> the token the driver tracks it by
        self.workers: set[str] = set()
        self.version = -1
        self.frames = 0
        self.deltas = 0
        self.bytes = 0
        self.gaps = 0
        self.null_model = 0  # (frame, row) pairs with no model
        self.workers_lost: list[tuple[int, str]] = []
        self.waiting_for_update = False

    # --- transport --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        self.raw += data
        if not self.head_done:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            self.raw = self.raw[end + 4 :]
            self.head_done = True
        # HTTP/1.1 chunked body: "<hex size>\r\n<bytes>\r\n" ...
        while self.raw:
            if self.chunk_left == 0:
                if self.skip_crlf:
                    if len(self.raw) < 2:
                        break
                    self.raw = self.raw[2:]
                    self.skip_crlf = False
                    continue
                line_end = self.raw.find(b"\r\n")
                if line_end < 0:
                    break
                size = int(self.raw[:line_end].split(b";")[0] or b"0", 16)
                self.raw = self.raw[line_end + 2 :]
                if size == 0:
                    break
                self.chunk_left = size
            take = self.raw[: self.chunk_left]
            self.raw = self.raw[len(take) :]
            self.chunk_left -= len(take)
            self.body += take
            if self.chunk_left == 0:
                self.skip_crlf = True
        self.frames_from_body(time.monotonic_ns())

    def frames_from_body(self, now: int) -> None:
        end = self.body.rfind(b"\n\n")
        if end < 0:
            return
        complete, self.body = self.body[: end + 2], self.body[end + 2 :]
        for frame in complete.split(b"\n\n"):
            if frame:
                self.frame(frame, now)

    # --- state ------------------------------------------------------------------------

    def token(self, row: dict[str, Any]) -> str:
        model = row.get("model")
        if isinstance(model, str) and model.startswith(self.shared.prefix):
            return model
        return str(row.get("request_id"))

    def frame(self, frame: bytes, now: int) -> None:
        event = b""
        data = b""
        for line in frame.split(b"\n"):
            if line.startswith(b"event:"):
                event = line[6:].strip()
            elif line.startswith(b"data:"):
                data = line[5:].strip()
        if event not in (b"update", b"delta") or not data:
            return
        body = orjson.loads(data)
        self.frames += 1
        if event == b"update":
            self.apply_update(body, now)
        elif not self.waiting_for_update:
            self.apply_delta(body, now)
        self.became_ready()

    def apply_update(self, body: dict[str, Any], now: int) -> None:
        rows = {str(r["key"]): r for r in body.get("active_requests") or []}
        for key in [key for key in self.rows if key not in rows]:
            self.drop(key, now)
        for row in rows.values():
            self.put(row, now)
        self.set_workers(body.get("workers"), now)
        self.version = int(body.get("version", -1))
        self.waiting_for_update = False

    def apply_delta(self, body: dict[str, Any], now: int) -> None:
        self.deltas += 1
        if body.get("base") != self.version:
            self.gaps += 1
            self.waiting_for_update = True
            return
        for key in body.get("remove") or []:
            self.drop(str(key), now)
        for row in body.get("upsert") or []:
            self.put(row, now)
        if "workers" in body:
            self.set_workers(body["workers"], now)
        self.version = int(body["version"])

    def put(self, row: dict[str, Any], now: int) -> None:
        key = str(row["key"])
        if row.get("model") is None:
            self.null_model += 1
        token = self.token(row)
        old = self.keys.get(key)
        if old is not None and old != token and self.stamps:
            self.shared.gone.setdefault(old, now)
        self.rows[key] = row
        self.keys[key] = token
        if self.stamps:
            self.shared.first.setdefault(token, now)

    def drop(self, key: str, now: int) -> None:
        self.rows.pop(key, None)
        token = self.keys.pop(key, None)
        if token is not None and self.stamps:
            self.shared.gone.setdefault(token, now)

    def set_workers(self, workers: Any, now: int) -> None:
        if not isinstance(workers, list):
            return
        ids = {str(w.get("worker_id")) for w in workers if isinstance(w, dict)}
        for wid in self.workers - ids:
            self.workers_lost.append((now, wid))
        self.workers = ids

    def digest(self) -> str:
        """Order-free digest of the rows held (worker, request id, model, phase, bytes out)."""
        parts = sorted(
            f"{r.get('worker_id')}|{r.get('request_id')}|{r.get('model')}|{r.get('phase')}|"
            f"{r.get('bytes_out')}"
            for r in self.rows.values()
        )
        return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def answer(shared: Shared, cmd: bytes, arg: bytes) -> Any:
    """The reply to one command line (see the module docstring)."""
    first = shared.clients[0] if shared.clients else None
    if cmd == b"sample":
        keys = list(first.keys.values()) if first else []
        workers = sorted(first.workers) if first else []
        version = first.version if first else -1
        return {"keys": keys, "version": version, "workers": workers}
    if cmd == b"report":
        return {
            "first": shared.first,
            "gone": shared.gone,
            "clients": [
                {
                    "rows": len(c.rows),
                    "digest": c.digest(),
                    "keys": sorted(c.keys.values()) if c is first else [],
                    "version": c.version,
                    "frames": c.frames,
                    "deltas": c.deltas,
                    "bytes": c.bytes,
                    "gaps": c.gaps,
                    "null_model": c.null_model,
                    "workers_lost": c.workers_lost,
                    "open": c.open,
                }
                for c in shared.clients
            ],
        }
    return unknown(cmd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = client_parser("bench.viewclient")
    parser.add_argument("--prefix", default="\0", help="model prefix of the run's tokens")
    args = parser.parse_args(argv)
    shared = Shared(args.prefix)
    # Only the first client stamps; clients are kept in index order, so it is clients[0].
    return run_clients(
        args,
        shared,
        lambda i, req: View(shared, req, stamps=i == 0),
        lambda cmd, arg: answer(shared, cmd, arg),
    )


if __name__ == "__main__":
    sys.exit(main())
