"""Fan-out: one stream-service process, N SSE clients, a steady rate of changes.

The changes come from a :class:`~services.proxy.publisher.Publisher` driven directly in the
bench driver (no HTTP in the way): each change ends the previous token's row and starts the
next one's, which the publisher sends as one batch, so the hub sees one change per tick. A
change's latency for one client is from ``Publisher.start`` to the client's bytes holding the
token. Afterwards every client's last ``update`` must hold exactly the final row.

Pinning (2 cores): the stream service alone on core 1; Redis, the driver and the client
processes on core 0. The stream service's cost is then what core 1 does, and the clients
measure their own CPU to show they are not what limits the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import CPUS, CpuMeter, Profiler, fleet, pin, rss_kb
from bench.report import percentile
from bench.sseload import SSEPool
from vdm_hub.services.proxy.publisher import Publisher
from vdm_hub.shared.schema import Outcome, Phase, Row
from vdm_hub.shared.settings import Settings

STREAM_PATH = "/metrics/active-requests/stream"
STREAM_CORE, LOAD_CORE = [1], [0]


@dataclass
class FanoutResult:
    clients: int
    connected: int
    rate: float
    changes: int
    p50: float
    p95: float
    p99: float
    missed: int
    final_ok: int
    rss_per_client_kb: float
    stream_cores: float
    stream_us_per_client_update: float
    client_cores: float
    stream_waited: float
    per_token: list[tuple[int, float, float]]
    wall: float
    profile: list[tuple[str, float, float]] = field(default_factory=list)
    profile_error: str = ""


def make_row(request_id: str, worker_id: str) -> Row:
    return Row(
        request_id=request_id,
        worker_id=worker_id,
        method="POST",
        path="/v1/chat/completions",
        model="gpt-4o-mini",
        provider="openai",
        is_streaming=True,
        start_time=time.time(),
        phase=Phase.UPSTREAM,
        bytes_out=0,
        input_tokens=None,
        output_tokens=None,
    )


@contextlib.contextmanager
def pinned_self(cpus: list[int]) -> Iterator[None]:
    before = os.sched_getaffinity(0)
    pin(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def end_request(pub: Publisher, rid: str) -> None:
    pub.end(
        rid,
        status=200,
        outcome=Outcome.OK,
        duration_ms=1.0,
        bytes_out=0,
        input_tokens=None,
        output_tokens=None,
    )


async def fanout(
    *,
    clients: int,
    rate: float,
    changes: int,
    client_procs: int,
    profile: Path | None = None,
) -> FanoutResult:
    run = f"f{int(time.time() * 1000) % 10**8}"
    pinning = CPUS >= 2
    with fleet(f"bench-{run}") as f, pinned_self(LOAD_CORE if pinning else list(range(CPUS))):
        f.start_redis(cpus=LOAD_CORE if pinning else None)
        stream = f.start("stream", env=f.env(), cpus=STREAM_CORE if pinning else None)
        settings = Settings(
            redis_url=f.env()["REDIS_URL"], key_prefix=f.prefix, worker_id=f"{run}-pub"
        )
        pub = Publisher(settings)
        pool = SSEPool()
        try:
            await pub.start_background()
            async with asyncio.timeout(10):
                await pub.wait_registered()
            rss_before = rss_kb(stream.pid)
            await pool.start(
                stream.url + STREAM_PATH,
                clients,
                procs=client_procs,
                cpus=LOAD_CORE if pinning else None,
            )
            profiler = Profiler(stream.pid, profile, nonblocking=True) if profile else None
            stream_meter = CpuMeter([stream.pid]).start()
            client_meter = CpuMeter(pool.pids).start()
            sent: dict[str, int] = {}
            previous: str | None = None
            t_start = time.monotonic()
            for i in range(changes):
                tok = f"{run}-{i:06d}z"
                await pool.watch(tok)
                sent[tok] = time.monotonic_ns()
                if previous is not None:
                    end_request(pub, previous)
                pub.start(make_row(tok, pub.worker_id))
                previous = tok
                await asyncio.sleep(max(0.0, t_start + (i + 1) / rate - time.monotonic()))
            await asyncio.sleep(0.5)  # the last change's arrivals
            stream_meter.stop()
            if profiler is not None:
                await asyncio.to_thread(profiler.stop)
            client_meter.stop()
            rss_after = rss_kb(stream.pid)
            report = await pool.report()
            await pool.forget()
            final_ok = await pool.final(previous or "", 1)
        finally:
            await pool.close()
            await pub.close(grace=2)
    latencies: list[float] = []
    missed = 0
    per_token: list[tuple[int, float, float]] = []  # (clients that saw it, first ms, last ms)
    for tok, t0 in sent.items():
        arrivals = report["seen"].get(tok, [])
        missed += pool.ready - len(arrivals)
        latencies += [(t - t0) / 1e6 for t in arrivals]
        if arrivals:
            per_token.append(
                (len(arrivals), (min(arrivals) - t0) / 1e6, (max(arrivals) - t0) / 1e6)
            )
    latencies.sort()
    updates = changes * max(1, pool.ready)
    return FanoutResult(
        clients=clients,
        connected=pool.ready,
        rate=rate,
        changes=changes,
        p50=percentile(latencies, 50),
        p95=percentile(latencies, 95),
        p99=percentile(latencies, 99),
        missed=missed,
        final_ok=final_ok,
        rss_per_client_kb=(rss_after - rss_before) / max(1, pool.ready),
        stream_cores=stream_meter.share,
        stream_us_per_client_update=stream_meter.cpu / updates * 1e6,
        client_cores=client_meter.share,
        stream_waited=stream_meter.waited,
        per_token=per_token,
        wall=stream_meter.wall,
        profile=profiler.summary() if profiler else [],
        profile_error=profiler.error if profiler else "",
    )
