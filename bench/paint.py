"""The dashboard's first paint and churn in headless Chromium, today's commit next to another.

Redis holds ``rows`` requests in flight, written by :class:`bench.rows.Churn`'s fake workers
(the worker's own Lua scripts, no HTTP), which keep ``churn`` requests/s starting, progressing
and ending throughout. Today's ``vdm-hub stream`` and ``vdm-hub dashboard`` run against that
Redis; with a baseline commit (``--baseline REF``, :mod:`bench.baseline`) so do that commit's
stream service and dashboard, from its own tree, against the same Redis and the same fleet.
The sides take turns (A B B A ...): each navigation opens ``/dashboard/metrics`` in a fresh
browser context and is measured in two phases by :class:`bench.browserload.Browser`: the
first paint, from navigation to the grid complete (every row in the grid, the rows in view
drawn with their model), with the longest main-thread task and the tasks over 50 ms on the
way; then ``settle_s`` seconds in which the page does what it put off until then; then
``churn_s`` seconds of churn, the steady state, with their long tasks.

Pinning (2 cores): Redis, the services and this driver (the churn) on core 0; Chromium free
on both. Chromium is several processes (browser, GPU, network, renderer) whose work the page
waits for: on one core of its own they queue behind each other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import baseline
from bench.browserload import Browser, PageLoad
from bench.fanout import pinned_self
from bench.procs import CPUS, ROOT, Fleet, fleet
from bench.rows import Churn, _redis_rows
from vdm_hub.shared.embedded_redis import free_port
from vdm_hub.shared.keys import Keys

OTHER_CORE = [0]
PAGE = "/dashboard/metrics"


@dataclass
class Side:
    """One commit's page at one row count: every navigation measured."""

    label: str
    rows: int
    loads: list[PageLoad] = field(default_factory=list)

    @property
    def ok(self) -> list[PageLoad]:
        return [load for load in self.loads if not load.error]

    @property
    def errors(self) -> list[str]:
        return [load.error for load in self.loads if load.error]

    def median(self, attr: str) -> float:
        values = [float(getattr(load, attr)) for load in self.ok]
        return statistics.median(values) if values else float("nan")

    def worst(self, attr: str) -> float:
        values = [float(getattr(load, attr)) for load in self.ok]
        return max(values) if values else float("nan")

    def per_10s(self) -> float:
        """Long-task ms per 10 s of churn, over every navigation's window."""
        seconds = sum(load.churn_s for load in self.ok)
        return sum(load.churn_total_ms for load in self.ok) * 10 / seconds if seconds else 0.0


@dataclass
class PaintResult:
    sides: list[Side]
    churn_rate: float
    settle_s: float
    churn_s: float
    baseline: str | None  # as described by git, when there was one


def _start_side(f: Fleet, root: Path) -> str:
    """A stream service and a dashboard of the tree at ``root``; the dashboard's page URL."""
    dash_port = free_port()
    cors = {"VDM_CORS_ORIGINS": f"http://127.0.0.1:{dash_port}"}
    stream = f.start("stream", env=f.env(**cors), cpus=OTHER_CORE, root=root)
    dashboard = f.start(
        "dashboard",
        "--port",
        str(dash_port),
        env={"VDM_STREAM_PUBLIC_URL": stream.url},
        cpus=OTHER_CORE,
        root=root,
    )
    return dashboard.url + PAGE


async def paint(
    *,
    levels: list[int],
    churn_rate: float,
    loads: int,
    settle_s: float,
    churn_s: float,
    baseline_ref: str | None,
) -> PaintResult:
    """``loads`` navigations per side at each row count in ``levels``."""
    import redis.asyncio as aioredis

    run = f"p{int(time.time() * 1000) % 10**8}"
    pinning = CPUS >= 2
    sides: list[Side] = []
    with (
        tempfile.TemporaryDirectory(prefix="vdm-bench-paint-") as tmp,
        fleet(f"bench-{run}") as f,
        pinned_self(OTHER_CORE if pinning else list(range(CPUS))),
    ):
        f.start_redis(cpus=OTHER_CORE if pinning else None)
        urls = {"today": await asyncio.to_thread(_start_side, f, ROOT)}
        described = None
        if baseline_ref:
            described = baseline.describe(baseline_ref)
            old_root = baseline.checkout(baseline_ref, Path(tmp))
            urls[f"baseline {described}"] = await asyncio.to_thread(_start_side, f, old_root)
        churn = Churn(f.env()["REDIS_URL"], f.prefix, run)
        redis = aioredis.Redis.from_url(f.env()["REDIS_URL"])
        keys = Keys(f.prefix)
        # Playwright's sync API belongs to the thread that started it: one thread, all calls.
        thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chromium")
        loop = asyncio.get_running_loop()
        # The thread inherits this one's pinning: Chromium gets every core back.
        browser = await loop.run_in_executor(thread, Browser, list(range(CPUS)))
        try:
            await churn.open()
            for rows in levels:
                await churn.pause()
                await churn.fill(rows)
                deadline = time.monotonic() + 30
                while await _redis_rows(churn, redis, keys) < rows:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"Redis never held {rows} rows")
                    await asyncio.sleep(0.1)
                churn.go(churn_rate)
                by_label = {label: Side(label, rows) for label in urls}
                order = list(urls)
                for i in range(loads):
                    # A B, then B A: drift in the machine's load falls on both sides alike.
                    for label in order if i % 2 == 0 else reversed(order):
                        load = await loop.run_in_executor(
                            thread, _load, browser, urls[label], rows, settle_s, churn_s
                        )
                        by_label[label].loads.append(load)
                await churn.pause()
                sides += by_label.values()
        finally:
            await loop.run_in_executor(thread, browser.close)
            thread.shutdown()
            await churn.close()
            await redis.aclose()
    return PaintResult(sides, churn_rate, settle_s, churn_s, described)


def _load(browser: Browser, url: str, rows: int, settle_s: float, churn_s: float) -> PageLoad:
    return browser.load(url, want_rows=_want(rows), settle_s=settle_s, churn_s=churn_s)


def _want(rows: int) -> int:
    """Rows the grid must hold to count as complete: all of them, less the few the churn
    has moved in or out between two of the grid's batches (start and end come in pairs,
    so the count stays within a handful of ``rows``)."""
    return rows - max(5, rows // 500)
