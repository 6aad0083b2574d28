"""Rows in flight: what a client receives, snapshot mode vs delta mode, as the fleet grows.

One stream service (pinned alone on core 1), Redis, and fake workers: ``FAKE_WORKERS``
:class:`~services.proxy.publisher.Publisher` objects in the driver, writing through the same
Lua scripts a worker uses, so ``rows`` requests are in flight in Redis without ``rows`` HTTP
requests. Churn: ``churn`` requests per second each start a row, report progress on one and end
the oldest, so the count stays at ``rows``.

At each row count the two modes take turns on the same service and the same churn:

- *delta*: ``delta_clients`` on ``?delta=1``; all but ``TRACKING`` count bytes only
  (:mod:`bench.sseload` ``--count-only``), the rest keep the state and apply each delta
  (:mod:`bench.viewclient`: a delta's ``base`` must be the version held);
- *snapshot*: ``snapshot_clients`` on the plain stream (full ``update`` frames).

Per mode: bytes/s per client, new row visible (from ``Publisher.start`` to the first frame
that holds the row, complete: a start carries the whole row) p50/p99, gaps (a delta whose base
was not the version held), whether every tracking client's final state equals the truth (the
publishers' own rows: worker, request id, model, phase, bytes out), the stream service's CPU
and its RSS growth per client.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.browserload import LongTasks, long_tasks
from bench.fanout import end_request, make_row, pinned_self
from bench.procs import CPUS, ROOT, CpuMeter, fleet, rss_kb
from bench.report import percentile
from bench.sseload import SSEPool
from vdm_hub.services.proxy.publisher import Publisher
from vdm_hub.shared.embedded_redis import free_port
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.settings import Settings

STREAM_PATH = "/metrics/active-requests/stream"
STREAM_CORE, LOAD_CORE = [1], [0]
FAKE_WORKERS = 10
TRACKING = 4
TICK_S = 0.01


@dataclass
class ModeResult:
    mode: str
    rows: int
    clients: int
    connected: int
    bytes_per_client_s: float
    p50: float
    p99: float
    seen: int  # new rows seen by the stamping client
    started: int  # new rows started in the window
    gaps: int
    deltas: int
    final_ok: int
    tracking: int
    converge_s: float
    stream_cores: float
    rss_per_client_kb: float
    client_cores: float
    wall: float


# Each (row count, mode) phase, and the dashboard's long tasks when it was measured.
RowsResult = tuple[list[ModeResult], LongTasks | None]


class Churn:
    """Fake workers holding ``rows`` rows; ``step()`` starts one, progresses one, ends one."""

    def __init__(self, redis_url: str, prefix: str, run: str) -> None:
        self.run = run
        self.pubs = [
            Publisher(Settings(redis_url=redis_url, key_prefix=prefix, worker_id=f"{run}-w{i}"))
            for i in range(FAKE_WORKERS)
        ]
        self.live: list[collections.deque[str]] = [collections.deque() for _ in self.pubs]
        self.started: dict[str, int] = {}
        self.n = 0
        self.rng = random.Random(1)
        self.task: asyncio.Task[None] | None = None
        self.rate = 0.0

    async def open(self) -> None:
        for pub in self.pubs:
            await pub.start_background()
        async with asyncio.timeout(20):
            for pub in self.pubs:
                await pub.wait_registered()

    def start_one(self) -> str:
        self.n += 1
        k = self.n % len(self.pubs)
        rid = f"{self.run}-{self.n:08d}z"
        pub = self.pubs[k]
        self.started[rid] = time.monotonic_ns()
        pub.start(make_row(rid, pub.worker_id))
        self.live[k].append(rid)
        return rid

    def step(self) -> None:
        self.start_one()
        k = self.rng.randrange(len(self.pubs))
        if self.live[k]:
            rid = self.live[k][self.rng.randrange(len(self.live[k]))]
            self.pubs[k].progress(rid, {"phase": "streaming", "bytes_out": self.n})
        k = self.n % len(self.pubs)
        k = (k + 1) % len(self.pubs)
        if self.live[k]:
            end_request(self.pubs[k], self.live[k].popleft())

    async def fill(self, rows: int) -> None:
        """Grow or shrink to ``rows`` rows, in bounded batches so no publisher overflows."""
        total = sum(len(q) for q in self.live)
        while total < rows:
            for _ in range(min(2000, rows - total)):
                self.start_one()
                total += 1
            await asyncio.sleep(0.05)
        while total > rows:
            for k, q in enumerate(self.live):
                while q and total > rows:
                    end_request(self.pubs[k], q.popleft())
                    total -= 1
            await asyncio.sleep(0.05)

    def truth_digest(self) -> str:
        parts = sorted(
            f"{row.get('worker_id')}|{rid}|{row.get('model')}|{row.get('phase')}|"
            f"{row.get('bytes_out')}"
            for pub in self.pubs
            for rid, row in pub.active.items()
        )
        return hashlib.sha1("\n".join(parts).encode()).hexdigest()

    async def _run(self) -> None:
        t0 = time.monotonic()
        done = 0
        while True:
            due = int((time.monotonic() - t0) * self.rate)
            for _ in range(due - done):
                self.step()
            done = due
            await asyncio.sleep(TICK_S)

    def go(self, rate: float) -> None:
        self.rate = rate
        if self.task is None:
            self.task = asyncio.create_task(self._run(), name="rows-churn")

    async def pause(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    async def close(self) -> None:
        await self.pause()
        for pub in self.pubs:
            await pub.close(grace=2)


async def _redis_rows(churn: Churn, redis: Any, keys: Keys) -> int:
    return sum([int(await redis.hlen(keys.active(p.worker_id))) for p in churn.pubs])


async def rows_scenario(
    *,
    levels: list[int],
    churn_rate: float,
    delta_clients: int,
    snapshot_clients: int,
    window_s: float,
    browser_s: float = 0.0,
    root: Path = ROOT,
) -> RowsResult:
    """Both modes at each row count; then, with ``browser_s``, the dashboard in Chromium at the
    largest count under the same churn (its long tasks over ``browser_s`` seconds). ``root``
    runs another commit's stream service (``bench/baseline.py``)."""
    import redis.asyncio as aioredis

    run = f"r{int(time.time() * 1000) % 10**8}"
    pinning = CPUS >= 2
    results: list[ModeResult] = []
    page: LongTasks | None = None
    dash_port = free_port()
    cors = {"VDM_CORS_ORIGINS": f"http://127.0.0.1:{dash_port}"}
    with fleet(f"bench-{run}") as f, pinned_self(LOAD_CORE if pinning else list(range(CPUS))):
        f.start_redis(cpus=LOAD_CORE if pinning else None)
        stream = f.start(
            "stream", env=f.env(**cors), cpus=STREAM_CORE if pinning else None, root=root
        )
        churn = Churn(f.env()["REDIS_URL"], f.prefix, run)
        redis = aioredis.Redis.from_url(f.env()["REDIS_URL"])
        keys = Keys(f.prefix)
        try:
            await churn.open()
            for rows in levels:
                await churn.pause()
                await churn.fill(rows)
                deadline = time.monotonic() + 30
                while await _redis_rows(churn, redis, keys) != rows:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"Redis never held {rows} rows")
                    await asyncio.sleep(0.1)
                for mode, n in (("delta", delta_clients), ("snapshot", snapshot_clients)):
                    results.append(await _phase(stream, churn, mode, rows, n, churn_rate, window_s))
            if browser_s > 0:
                dashboard = f.start(
                    "dashboard", "--port", str(dash_port), env={"VDM_STREAM_PUBLIC_URL": stream.url}
                )
                churn.go(churn_rate)
                page = await asyncio.to_thread(
                    long_tasks,
                    dashboard.url + "/dashboard/metrics",
                    want_rows=levels[-1],
                    seconds=browser_s,
                )
                await churn.pause()
        finally:
            await churn.close()
            await redis.aclose()
    return results, page


async def _phase(
    stream: Any, churn: Churn, mode: str, rows: int, clients: int, rate: float, window_s: float
) -> ModeResult:
    url = stream.url + STREAM_PATH + ("?delta=1" if mode == "delta" else "")
    tracking = min(TRACKING if mode == "delta" else 2, clients)
    counting = clients - tracking
    rss_before = rss_kb(stream.pid)
    churn.go(rate)  # the clients connect under churn, as they would
    views = SSEPool()
    counters = SSEPool()
    try:
        # One process per state-keeping client: parsing large snapshots must not make one
        # client wait for another.
        await views.start(url, tracking, procs=tracking, module="bench.viewclient", cpus=LOAD_CORE)
        if counting:
            await counters.start(
                url, counting, procs=2 if counting > 200 else 1, cpus=LOAD_CORE,
                args=["--count-only"],
            )  # fmt: skip
        await asyncio.sleep(1.0)  # past the first (full) frame of every client
        bytes0 = await _bytes(counters) if counting else 0
        meter = CpuMeter([stream.pid]).start()
        client_meter = CpuMeter([*views.pids, *counters.pids]).start()
        window_t0 = time.monotonic_ns()
        await asyncio.sleep(window_s)
        window_t1 = time.monotonic_ns()
        meter.stop()
        client_meter.stop()
        # Steady state, at the end of the window: the first snapshot's buffers are gone by then.
        rss_after = rss_kb(stream.pid)
        bytes1 = await _bytes(counters) if counting else 0
        await churn.pause()
        # Quiet: every tracking client must come to the truth (bounded wait; snapshot pacing
        # can hold a large frame back for a while).
        truth = churn.truth_digest()
        t_quiet = time.monotonic()
        final_ok = 0
        reports: list[Any] = []
        while time.monotonic() - t_quiet < 15:
            reports = await views.command("report", timeout=60)
            cs = [c for r in reports for c in r["clients"]]
            final_ok = sum(1 for c in cs if c["digest"] == truth)
            if final_ok == len(cs):
                break
            await asyncio.sleep(0.5)
        converge = time.monotonic() - t_quiet
    finally:
        await churn.pause()
        await views.close()
        await counters.close()
    first = reports[0]["first"] if reports else {}
    started = {k: t for k, t in churn.started.items() if window_t0 <= t <= window_t1}
    lat = sorted((first[k] - t) / 1e6 for k, t in started.items() if k in first)
    seconds = (window_t1 - window_t0) / 1e9
    cs = [c for r in reports for c in r["clients"]]
    return ModeResult(
        mode=mode,
        rows=rows,
        clients=clients,
        connected=views.ready + counters.ready,
        bytes_per_client_s=(bytes1 - bytes0) / max(1, counting) / seconds if counting else 0.0,
        p50=percentile(lat, 50),
        p99=percentile(lat, 99),
        seen=len(lat),
        started=len(started),
        gaps=sum(int(c["gaps"]) for c in cs),
        deltas=sum(int(c["deltas"]) for c in cs),
        final_ok=final_ok,
        tracking=len(cs),
        converge_s=converge,
        stream_cores=meter.share,
        rss_per_client_kb=(rss_after - rss_before) / max(1, clients),
        client_cores=client_meter.share,
        wall=seconds,
    )


async def _bytes(pool: SSEPool) -> int:
    return sum(int(a["bytes"]) for a in await pool.command("bytes"))
