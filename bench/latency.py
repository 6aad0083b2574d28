"""End-to-end latency: a request enters a worker -> its row is in an ``update`` an SSE client got.

Real processes on loopback: Redis, the demo upstream, N workers, one stream service, and the
SSE clients in processes of their own (:mod:`bench.sseload`). ``held`` requests stay in flight
the whole time (the demo upstream holds them), so every update carries that many rows. Then
``probes`` requests go out, paced, round robin over the workers, each with our own
``X-Request-Id``; a probe's latency for one client is the time from writing the request to
the worker's socket until that client's stream holds the id (CLOCK_MONOTONIC on both sides).
It includes the hop into the worker, so it is, if anything, an overestimate.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bench.httpload import Conn, build_request, connect
from bench.procs import CpuMeter, Fleet, fleet
from bench.report import percentile
from bench.sseload import SSEPool

STREAM_PATH = "/metrics/active-requests/stream"
PROBE_HOLD_MS = 400  # long enough for the start to be seen before the end follows it


@dataclass
class E2EResult:
    workers: int
    clients: int
    held: int
    probes: int
    p50: float
    p95: float
    p99: float
    max: float
    missed: int
    pairs: int
    cpu: dict[str, float]  # cores used per role during the probes
    probe_rate: float


def token(run: str, i: int) -> str:
    # Fixed width, so no token is a prefix of another.
    return f"{run}-{i:06d}z"


async def start_system(f: Fleet, workers: int) -> tuple[str, list[str], str]:
    f.start_redis()
    upstream = f.start("demo-upstream", "--latency", "0")
    specs = f.hub_specs(upstream.url, workers, "--graceful-timeout", "1")
    started = await asyncio.to_thread(f.start_many, specs)
    return upstream.url, [s.url for s in started[:-1]], started[-1].url


async def e2e(
    *, workers: int, clients: int, held: int, probes: int, spacing: float, client_procs: int = 1
) -> E2EResult:
    run = f"e{int(time.time() * 1000) % 10**8}"
    with fleet(f"bench-{run}") as f:
        _, worker_urls, stream_url = await start_system(f, workers)
        pool = SSEPool()
        held_conns: list[Conn] = []
        try:
            await pool.start(stream_url + STREAM_PATH, clients, procs=client_procs)
            if pool.ready < clients:
                raise RuntimeError(f"only {pool.ready} of {clients} SSE clients connected")
            # Requests held in flight for the whole run.
            for i in range(held):
                url = worker_urls[i % workers]
                host, port = _hostport(url)
                req = build_request(
                    host,
                    port,
                    "/v1/chat/completions",
                    {"x-request-id": f"{run}-held-{i:04d}", "x-demo-delay-ms": "600000"},
                )
                conn = await connect(url)
                conn.send(req)
                held_conns.append(conn)
            # Probe connections: several per worker, so a held probe never blocks the next.
            per_worker = max(2, int(PROBE_HOLD_MS / 1000 / spacing / workers) + 2)
            probe_conns = [
                (url, await connect(url)) for _ in range(per_worker) for url in worker_urls
            ]
            # Let the held rows reach every client before timing anything.
            await _settle(pool, f"{run}-held-{held - 1:04d}" if held else None)

            pids = {
                "stream": [f.services[-1].pid],
                "workers": [s.pid for s in f.services if s.name == "worker"],
                "redis": [f.redis_pid],
                "sse clients": pool.pids,
            }
            meters = {role: CpuMeter(p).start() for role, p in pids.items()}
            sent: dict[str, int] = {}
            pending: list[asyncio.Future[bool]] = []
            t_start = time.monotonic()
            for i in range(probes):
                tok = token(run, i)
                url, conn = probe_conns[i % len(probe_conns)]
                host, port = _hostport(url)
                req = build_request(
                    host,
                    port,
                    "/v1/chat/completions",
                    {"x-request-id": tok, "x-demo-delay-ms": str(PROBE_HOLD_MS)},
                )
                await pool.watch(tok)
                sent[tok] = time.monotonic_ns()
                pending.append(conn.send(req))
                await asyncio.sleep(max(0.0, t_start + (i + 1) * spacing - time.monotonic()))
            async with asyncio.timeout(30):
                await asyncio.gather(*pending)
            await asyncio.sleep(0.5)  # the last probe's arrivals (the clients timestamp them)
            wall = time.monotonic() - t_start
            cpu = {role: m.stop().share for role, m in meters.items()}
            report = await pool.report()
            await pool.forget()
        finally:
            for conn in held_conns:
                if conn.transport is not None:
                    conn.transport.abort()
            await pool.close()
    latencies: list[float] = []
    missed = 0
    for tok, t0 in sent.items():
        arrivals = report["seen"].get(tok, [])
        missed += clients - len(arrivals)
        latencies += [(t - t0) / 1e6 for t in arrivals]
    latencies.sort()
    return E2EResult(
        workers=workers,
        clients=clients,
        held=held,
        probes=probes,
        p50=percentile(latencies, 50),
        p95=percentile(latencies, 95),
        p99=percentile(latencies, 99),
        max=latencies[-1] if latencies else float("nan"),
        missed=missed,
        pairs=len(sent) * clients,
        cpu=cpu,
        probe_rate=probes / wall,
    )


async def _settle(pool: SSEPool, tok: str | None) -> None:
    """Wait (bounded) until every client has an update holding ``tok``."""
    if tok is None:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if await _has(pool, tok):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the held requests never showed up on every stream ({tok})")


async def _has(pool: SSEPool, tok: str) -> bool:
    answers: list[Any] = await pool.command(f"has {tok}")
    return all(a["missing"] == 0 for a in answers)


def _hostport(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80
