"""Worker overhead: the instrumented worker against the same proxy with instrumentation off.

Two worker processes run side by side in front of one demo upstream: ``instrumented``
(LOG_REQUEST_METRICS=true, publishing into Redis) and ``bare``
(LOG_REQUEST_METRICS=false: the same ASGI proxy without the middleware and publisher). Rounds
alternate A B B A so drift in the machine's background load falls on both equally. Each round
is a closed loop of keep-alive connections from :mod:`bench.httpload` in its own process.

Then a stream service starts, and the instrumented worker's throughput is taken with and
without 1,000 SSE clients connected to it (rounds: without, with, with, without). The worker's
own CPU per request is reported next to throughput: it shows whether the worker pays for the
clients, apart from the cores the two share on this machine.

With a baseline commit (``--baseline REF``, :mod:`bench.baseline`), :func:`against_baseline`
runs that commit's worker, instrumented and bare, next to today's two in the same rounds.

Pinning (2 cores): the worker under test alone on core 1; upstream, Redis, stream service,
SSE clients and the load client on core 0. The worker is what is compared, so it gets a core
of its own; everything else sharing core 0 is the same for both sides of each comparison.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import baseline
from bench.httpload import HTTPLoad
from bench.procs import CPUS, ROOT, CpuMeter, fleet
from bench.sseload import SSEPool

WORKER_CORE, OTHER_CORE = [1], [0]
STREAM_PATH = "/metrics/active-requests/stream"


@dataclass
class Rounds:
    rps: dict[str, list[float]] = field(default_factory=dict)
    p50: dict[str, list[float]] = field(default_factory=dict)
    p99: dict[str, list[float]] = field(default_factory=dict)
    cpu_us: dict[str, list[float]] = field(default_factory=dict)  # worker CPU per request
    errors: int = 0

    def add(self, label: str, r: dict[str, Any]) -> None:
        self.rps.setdefault(label, []).append(r["rps"])
        self.p50.setdefault(label, []).append(r["p50"])
        self.p99.setdefault(label, []).append(r["p99"])
        self.cpu_us.setdefault(label, []).append(r["cpu_us"])
        self.errors += r["errors"]

    def mean(self, which: str, label: str) -> float:
        values: list[float] = getattr(self, which)[label]
        return statistics.fmean(values)

    def cells(self, label: str, digits: int = 2) -> list[object]:
        """Rounds, mean req/s, p50 and p99 (ms, to ``digits``), CPU per request: a table row."""
        return [
            len(self.rps[label]),
            self.mean("rps", label),
            f"{self.mean('p50', label):.{digits}f}",
            f"{self.mean('p99', label):.{digits}f}",
            self.mean("cpu_us", label),
        ]

    def _block_means(self, which: str, a: str, b: str) -> list[tuple[float, float]]:
        """(mean of ``a``, mean of ``b``) within each A B B A block (rounds 2k, 2k+1 of each
        side): drift in the machine's background load cancels inside a block, so these are the
        comparable units."""
        xs: list[float] = getattr(self, which)[a]
        ys: list[float] = getattr(self, which)[b]
        return [
            (statistics.fmean(xs[i : i + 2]), statistics.fmean(ys[i : i + 2]))
            for i in range(0, min(len(xs), len(ys)) - 1, 2)
        ]

    def block_ratios(self, which: str, a: str, b: str) -> list[float]:
        return [x / y for x, y in self._block_means(which, a, b)]

    def block_differences(self, which: str, a: str, b: str) -> list[float]:
        return [x - y for x, y in self._block_means(which, a, b)]


async def _round(
    load: HTTPLoad, url: str, concurrency: int, seconds: float, worker_pid: int
) -> dict[str, Any]:
    meter = CpuMeter([worker_pid]).start()
    result = await load.run(url, concurrency, seconds)
    meter.stop()
    result["cpu_us"] = meter.cpu / max(1, result["requests"]) * 1e6
    return result


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
        inst, bare = await asyncio.to_thread(
            f.start_many,
            [
                ("worker", args, f.env(VDM_WORKER_ID=f"{run}-inst"), worker_cpus),
                (
                    "worker",
                    args,
                    f.env(VDM_WORKER_ID=f"{run}-bare", LOG_REQUEST_METRICS="false"),
                    worker_cpus,
                ),
            ],
        )
        pids = {"instrumented": inst.pid, "bare": bare.pid}
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
                    throughput.add(
                        label, await _round(load, urls[label], concurrency, round_s, pids[label])
                    )
            load_cores = meter.stop().share
            latency = Rounds()
            for _ in range(pairs):
                for label in ("instrumented", "bare", "bare", "instrumented"):
                    latency.add(label, await _round(load, urls[label], 1, round_s, pids[label]))
            # Only now the stream service: during the A/B rounds its work (and the CPU it
            # would take from the upstream on core 0) would be charged to the worker.
            stream = await asyncio.to_thread(f.start, "stream", env=f.env(), cpus=other)
            sse = Rounds()
            target, pid = urls["instrumented"], pids["instrumented"]
            sse.add("without", await _round(load, target, concurrency, round_s, pid))
            await pool.start(stream.url + STREAM_PATH, sse_clients, procs=2, cpus=other)
            for _ in range(2):
                sse.add("with", await _round(load, target, concurrency, round_s, pid))
            await pool.close()
            sse.add("without", await _round(load, target, concurrency, round_s, pid))
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


# Today's worker and the baseline's, each instrumented and bare; a block runs them in this
# order and back (A B C D D C B A), so each side gets two rounds a block, like A B B A above.
BASELINE_SIDES = ("instrumented", "baseline instrumented", "bare", "baseline bare")


@dataclass
class BaselineResult:
    commit: str  # as described by git: short hash and date
    rounds: Rounds
    concurrency: int
    round_s: float


async def against_baseline(
    commit: str, *, concurrency: int, round_s: float, pairs: int
) -> BaselineResult:
    """The four workers of :data:`BASELINE_SIDES` in front of one upstream, each pinned alone
    on the worker core while its round runs (they share it, but only one gets load)."""
    run = f"b{int(time.time() * 1000) % 10**8}"
    pinning = CPUS >= 2
    worker_cpus = WORKER_CORE if pinning else None
    other = OTHER_CORE if pinning else None
    with (
        tempfile.TemporaryDirectory(prefix="vdm-bench-baseline-") as tmp,
        fleet(f"bench-{run}") as f,
    ):
        old_root = baseline.checkout(commit, Path(tmp))
        f.start_redis(cpus=other)
        upstream = f.start("demo-upstream", "--latency", "0", cpus=other)
        args = ["--upstream", upstream.url, "--graceful-timeout", "1"]
        urls: dict[str, str] = {}
        pids: dict[str, int] = {}
        for i, label in enumerate(BASELINE_SIDES):
            env = f.env(VDM_WORKER_ID=f"{run}-{i}")
            if label.endswith("bare"):
                env["LOG_REQUEST_METRICS"] = "false"
            root = old_root if label.startswith("baseline") else ROOT
            worker = await asyncio.to_thread(
                f.start, "worker", *args, env=env, cpus=worker_cpus, root=root
            )
            urls[label] = worker.url + "/v1/chat/completions"
            pids[label] = worker.pid
        load = await HTTPLoad().start(cpus=other)
        try:
            for url in urls.values():  # warm up, not counted
                await load.run(url, concurrency, min(1.0, round_s))
            rounds = Rounds()
            order = (*BASELINE_SIDES, *reversed(BASELINE_SIDES))
            for _ in range(pairs):
                for label in order:
                    rounds.add(
                        label, await _round(load, urls[label], concurrency, round_s, pids[label])
                    )
        finally:
            await load.close()
    return BaselineResult(baseline.describe(commit), rounds, concurrency, round_s)
