"""Worker overhead: the instrumented worker against the same proxy with instrumentation off.

Two worker processes run side by side in front of one demo upstream: ``instrumented``
(LOG_REQUEST_METRICS=true, publishing into Redis, a stream service consuming it) and ``bare``
(LOG_REQUEST_METRICS=false: the same ASGI proxy without the middleware and publisher). Rounds
alternate A B B A so drift in the machine's background load falls on both equally. Each round
is a closed loop of keep-alive connections from :mod:`bench.httpload` in its own process.

Then the instrumented worker's throughput with and without 1,000 SSE clients connected to the
stream service (rounds: without, with, with, without).

Pinning (2 cores): the worker under test alone on core 1; upstream, Redis, stream service,
SSE clients and the load client on core 0. The worker is what is compared, so it gets a core
of its own; everything else sharing core 0 is the same for both sides of each comparison.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from bench.httpload import HTTPLoad
from bench.procs import CPUS, CpuMeter, fleet
from bench.sseload import SSEPool

WORKER_CORE, OTHER_CORE = [1], [0]
STREAM_PATH = "/metrics/active-requests/stream"


@dataclass
class Rounds:
    rps: dict[str, list[float]] = field(default_factory=dict)
    p50: dict[str, list[float]] = field(default_factory=dict)
    p99: dict[str, list[float]] = field(default_factory=dict)
    errors: int = 0

    def add(self, label: str, r: dict[str, Any]) -> None:
        self.rps.setdefault(label, []).append(r["rps"])
        self.p50.setdefault(label, []).append(r["p50"])
        self.p99.setdefault(label, []).append(r["p99"])
        self.errors += r["errors"]

    def mean(self, which: str, label: str) -> float:
        values: list[float] = getattr(self, which)[label]
        return statistics.fmean(values)


@dataclass
class OverheadResult:
    throughput: Rounds
    latency: Rounds
    sse: Rounds
    concurrency: int
    round_s: float
    load_cores: float
    sse_clients: int


async def overhead(
    *, concurrency: int, round_s: float, pairs: int, sse_clients: int
) -> OverheadResult:
    run = f"o{int(time.time() * 1000) % 10**8}"
    pinning = CPUS >= 2
    worker_cpus = WORKER_CORE if pinning else None
    other = OTHER_CORE if pinning else None
    with fleet(f"bench-{run}") as f:
        f.start_redis(cpus=other)
        upstream = f.start("demo-upstream", "--latency", "0", cpus=other)
        args = ["--upstream", upstream.url, "--graceful-timeout", "1"]
        inst, bare, stream = await asyncio.to_thread(
            f.start_many,
            [
                ("worker", args, f.env(VDM_WORKER_ID=f"{run}-inst"), worker_cpus),
                (
                    "worker",
                    args,
                    f.env(VDM_WORKER_ID=f"{run}-bare", LOG_REQUEST_METRICS="false"),
                    worker_cpus,
                ),
                ("stream", [], f.env(), other),
            ],
        )
        path = "/v1/chat/completions"
        urls = {"instrumented": inst.url + path, "bare": bare.url + path}
        load = await HTTPLoad().start(cpus=other)
        pool = SSEPool()
        try:
            # Warm both (connection pools, imports on first use), not counted.
            for url in urls.values():
                await load.run(url, concurrency, min(1.0, round_s))
            throughput = Rounds()
            meter = CpuMeter([load.pid]).start()
            for _ in range(pairs):
                for label in ("instrumented", "bare", "bare", "instrumented"):
                    throughput.add(label, await load.run(urls[label], concurrency, round_s))
            load_cores = meter.stop().share
            latency = Rounds()
            for _ in range(pairs):
                for label in ("instrumented", "bare", "bare", "instrumented"):
                    latency.add(label, await load.run(urls[label], 1, round_s))
            sse = Rounds()
            target = urls["instrumented"]
            sse.add("without", await load.run(target, concurrency, round_s))
            await pool.start(stream.url + STREAM_PATH, sse_clients, procs=2, cpus=other)
            for _ in range(2):
                sse.add("with", await load.run(target, concurrency, round_s))
            await pool.close()
            sse.add("without", await load.run(target, concurrency, round_s))
        finally:
            await pool.close()
            await load.close()
    return OverheadResult(
        throughput=throughput,
        latency=latency,
        sse=sse,
        concurrency=concurrency,
        round_s=round_s,
        load_cores=load_cores,
        sse_clients=pool.ready,
    )
