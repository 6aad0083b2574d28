"""End-to-end, side by side: vdm-hub and vandamme-proxy 2.0.9 in front of one demo upstream.

One run, one upstream, both systems up at once: vdm-hub (Redis, ``workers`` workers, one stream
service) and vandamme-proxy (one process, :mod:`bench.peer`). Each gets ``clients`` SSE
clients on its own stream (:mod:`bench.rowwatch`) and ``held`` background requests that stay
in flight. Then the probes go out interleaved, vdm, vandamme, vdm, ... and every second probe
to each of them is a streaming one; each probe has a model name of its own (the token).

Per (probe, client) pair:

- *visible with its model*: from writing the request to the first frame holding the token
  (the probe's model): the row as a user wants to see it;
- *gone*: from the last byte of the response reaching the probe's client to the first frame
  without the token.

The tracking clients check every row of every frame (a row without a model the client sent
is a violation). Both systems are held to the same hold (``hold_ms``, the demo upstream's
``x-demo-delay-ms``) and the same answer sizes.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.httpload import Conn, connect
from bench.latency import _hostport
from bench.peer import VERSION, Vandamme
from bench.procs import CpuMeter, fleet
from bench.report import percentile
from bench.sseload import SSEPool

STREAM_PATH = "/metrics/active-requests/stream"
HOLD_MS = 400
HELD_PREFIX = "held:"  # vandamme's provider for the background requests (bench/peer.py)


@dataclass
class Side:
    name: str
    probes: int = 0
    errors: int = 0
    appear: list[float] = field(default_factory=list)  # ms, one per (probe, client)
    gone: list[float] = field(default_factory=list)
    missed: int = 0  # (probe, client) pairs that never showed the row with its model
    stuck: int = 0  # pairs that showed it and never removed it
    pairs: int = 0
    violations: int = 0
    violating_rows: int = 0
    gaps: int = 0  # delta frames a client could not apply (its view was wrong until an update)
    examples: list[str] = field(default_factory=list)
    final_rows: list[int] = field(default_factory=list)  # rows in tracking clients' last frame
    cpu: float = 0.0  # cores: everything this side runs (not its SSE clients)
    client_cpu: float = 0.0

    def p(self, which: str, q: float) -> float:
        return percentile(sorted(getattr(self, which)), q)


@dataclass
class VsResult:
    workers: int
    clients: int
    held: int
    hold_ms: int
    sides: dict[str, Side]
    wall: float
    error: str = ""


def probe_request(host: str, port: int, model: str, stream: bool, extra: dict[str, str]) -> bytes:
    body = orjson.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8,
            "stream": stream,
        }
    )
    lines = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{lines}\r\n"
    ).encode() + body


class Timed(Conn):
    """A connection that stamps when the last byte of each probe's response arrived."""

    def __init__(self, request: bytes) -> None:
        super().__init__(request)
        self.token = ""
        self.done_at: dict[str, int] = {}

    def probe(self, token: str, request: bytes, done_at: dict[str, int]) -> asyncio.Future[bool]:
        self.token, self.done_at = token, done_at
        return self.send(request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        pending = self.done is not None and not self.done.done()
        super().data_received(data)
        if pending and self.done is not None and self.done.done():
            self.done_at[self.token] = now


async def timed_connect(url: str) -> Timed:
    host, port = _hostport(url)
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: Timed(b""), host, port)
    return conn


async def vs_vandamme(
    *, workers: int, clients: int, held: int, probes: int, spacing: float, track: int = 2
) -> VsResult:
    run = f"v{int(time.time() * 1000) % 10**8}"
    names = ("vdm-hub", f"vandamme {VERSION}")
    sides = {n: Side(n) for n in names}
    with (
        fleet(f"bench-{run}") as f,
        tempfile.TemporaryDirectory(prefix="vdm-bench-vandamme-") as tmp,
    ):
        f.start_redis()
        upstream = f.start("demo-upstream", "--latency", "0", "--chunks", "8")
        specs = f.hub_specs(upstream.url, workers, "--graceful-timeout", "1")
        vd = Vandamme(upstream.url, Path(tmp), hold_ms=HOLD_MS)
        pools = {n: SSEPool() for n in names}
        conns: list[Conn] = []
        probe_conns: dict[str, list[tuple[str, Timed]]] = {}
        try:
            started = await asyncio.to_thread(f.start_many, specs)
            worker_urls = [s.url for s in started[:-1]]
            stream_url = started[-1].url
            await asyncio.to_thread(vd.wait_ready)
            # Each side read as its own dashboard reads it: ours as deltas (``?delta=1``),
            # vandamme's as the full snapshots it sends.
            streams = {
                names[0]: stream_url + STREAM_PATH + "?delta=1",
                names[1]: vd.url + STREAM_PATH,
            }
            modes = {names[0]: ["--delta"], names[1]: []}
            for n in names:
                await pools[n].start(
                    streams[n],
                    clients,
                    module="bench.rowwatch",
                    args=["--track", str(track), *modes[n]],
                )
                if pools[n].ready < clients:
                    raise RuntimeError(f"{n}: only {pools[n].ready} of {clients} SSE clients")
            # Background requests, in flight for the whole run, with models the clients know.
            for i in range(held):
                model = f"{run}-held-{i:04d}z"
                for n in names:
                    await pools[n].command(f"known {model}")
                for url, sent_model, extra in (
                    (worker_urls[i % workers], model, {"x-demo-delay-ms": "600000"}),
                    (vd.url, HELD_PREFIX + model, {}),
                ):
                    host, port = _hostport(url)
                    conn = await connect(url)
                    conn.send(probe_request(host, port, sent_model, False, extra))
                    conns.append(conn)
            await _settle(pools, held)
            # Probe connections: a free one per probe (a busy one would lose its answer), and a
            # new one when none is free.
            probe_conns[names[0]] = [
                (u, await timed_connect(u)) for _ in range(2) for u in worker_urls
            ]
            probe_conns[names[1]] = [(vd.url, await timed_connect(vd.url)) for _ in range(4)]
            meters = {
                names[0]: CpuMeter([s.pid for s in started]).start(),
                names[1]: CpuMeter([vd.pid]).start(),
            }
            client_meters = {n: CpuMeter(pools[n].pids).start() for n in names}
            sent: dict[str, tuple[str, int]] = {}
            done_at: dict[str, int] = {}
            futures: list[tuple[str, asyncio.Future[bool]]] = []
            t0 = time.monotonic()
            for i in range(probes):
                n = names[i % 2]
                k = i // 2
                stream = k % 2 == 1
                token = f"{run}-p{i:05d}z"
                url, conn = await _free(probe_conns[n], k, worker_urls if i % 2 == 0 else [vd.url])
                host, port = _hostport(url)
                extra = {"x-demo-delay-ms": str(HOLD_MS)} if n == names[0] else {}
                request = probe_request(host, port, token, stream, extra)
                await pools[n].command(f"watch {token}")
                sent[token] = (n, time.monotonic_ns())
                futures.append((n, conn.probe(token, request, done_at)))
                sides[n].probes += 1
                await asyncio.sleep(max(0.0, t0 + (i + 1) * spacing - time.monotonic()))
            await asyncio.wait([fut for _, fut in futures], timeout=60)
            for n, fut in futures:
                sides[n].errors += 0 if fut.done() and fut.result() else 1
            await asyncio.sleep(1.0)  # the last removals
            wall = time.monotonic() - t0
            for n in names:
                sides[n].cpu = meters[n].stop().share
                sides[n].client_cpu = client_meters[n].stop().share
            reports = {n: await pools[n].command("report", timeout=60) for n in names}
            finals = {n: await pools[n].command("rows") for n in names}
        finally:
            for conn in [*conns, *(c for cs in probe_conns.values() for _, c in cs)]:
                if conn.transport is not None:
                    conn.transport.abort()
            for pool in pools.values():
                await pool.close()
            await asyncio.to_thread(vd.stop)
    for n in names:
        side = sides[n]
        seen: dict[str, list[int]] = {}
        gone: dict[str, list[int]] = {}
        for answer in reports[n]:
            for tok, stamps in answer["seen"].items():
                seen.setdefault(tok, []).extend(stamps)
            for tok, stamps in answer["gone"].items():
                gone.setdefault(tok, []).extend(stamps)
            side.violations += answer["violations"]
            side.gaps += answer["gaps"]
            side.violating_rows += answer["violating"]
            side.examples += answer["examples"]
        for answer in finals[n]:
            side.final_rows += [len(models) for models in answer]
        for tok, (owner, t_sent) in sent.items():
            if owner != n:
                continue
            side.pairs += clients
            arrivals = seen.get(tok, [])
            side.missed += clients - len(arrivals)
            side.appear += [(t - t_sent) / 1e6 for t in arrivals]
            removals = gone.get(tok, [])
            side.stuck += len(arrivals) - len(removals)
            if tok in done_at:
                side.gone += [(t - done_at[tok]) / 1e6 for t in removals]
    return VsResult(workers, clients, held, HOLD_MS, sides, wall)


async def _settle(pools: dict[str, SSEPool], held: int) -> None:
    """Until every tracking client's last frame shows the ``held`` background rows."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answers: list[Any] = []
        for pool in pools.values():
            answers += await pool.command("rows")
        if all(len(models) >= held for answer in answers for models in answer):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the {held} background requests never showed on both streams")


async def _free(conns: list[tuple[str, Timed]], k: int, urls: list[str]) -> tuple[str, Timed]:
    """A connection with no request outstanding, to ``urls[k % len]``; a new one if none is."""
    url = urls[k % len(urls)]
    for entry in conns:
        u, conn = entry
        if u == url and not conn.lost and (conn.done is None or conn.done.done()):
            return entry
    entry = (url, await timed_connect(url))
    conns.append(entry)
    return entry
