"""Fidelity under load: thousands of real requests held in flight, the view against the truth.

Real processes on loopback: Redis, the demo upstream, ``workers`` workers, one stream service;
the load (:mod:`bench.holdload`, raw sockets, no client pool) keeps ``conns`` requests in flight
through the workers, each held ``hold`` seconds by the upstream; one view client
(:mod:`bench.viewclient`) keeps the stream's state as the dashboard does.

Every ``SAMPLE_S`` the driver asks, at once, the load for the ids it has in flight (the truth),
the view client for the rows it holds, Redis for the size of each worker's active hash and
each worker for ``/_vdm/status`` (its own count in flight, events dropped). A sample compares
the two sets: *missing* (in flight, not in the view) and *extra* (in the view, not in flight);
an id missing although it was sent more than ``STALE_S`` before the sample, or still shown
more than ``STALE_S`` after its response ended, is *stale*: a lag no change in transit
explains. Per request, the view's lag is from the send to the row's first appearance and from
the response's last byte to its removal. Reaped workers are counted from the view (a worker
leaving the ``workers`` list) and from the stream service's log.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import redis.asyncio as aioredis

from bench.holdload import HoldLoad
from bench.procs import CpuMeter, fleet
from bench.report import percentile
from bench.sseload import SSEPool
from vdm_hub.shared.keys import Keys

STREAM_PATH = "/metrics/active-requests/stream"
SAMPLE_S = 0.5
STALE_S = 1.0


@dataclass
class Sample:
    t: float  # seconds since the load started
    truth: int
    view: int
    redis: int
    missing: int
    extra: int
    stale_missing: int
    stale_extra: int
    load_per_worker: list[int]
    worker_in_flight: list[int]
    status_ms: list[float]  # each worker's /_vdm/status answer time (its loop lag, roughly)
    extra_ids: list[str] = field(default_factory=list, repr=False)
    now_ns: int = 0


@dataclass
class FidelityResult:
    workers: int
    conns: int
    hold: tuple[float, float]
    samples: list[Sample]
    appear_ms: list[float]
    gone_ms: list[float]
    never_seen: int
    never_gone: int
    ghosts: int
    requests: int
    errors: int
    reasons: dict[str, int]
    connect_errors: int
    reaped: int
    workers_lost: int
    reap_lines: list[str]
    dropped: dict[str, int]
    worker_notable: list[str]
    final_ok: bool
    final_detail: str
    cores: dict[str, float]
    delta: bool
    peak_truth: int = 0
    notes: list[str] = field(default_factory=list)

    def p(self, which: str, q: float) -> float:
        return percentile(sorted(getattr(self, which)), q)


async def fidelity(
    *,
    workers: int,
    conns: int,
    rate: float,
    hold: tuple[float, float],
    steady_s: float,
    delta: bool = True,
) -> FidelityResult:
    run = f"fi{int(time.time() * 1000) % 10**8}"
    with fleet(f"bench-{run}") as f:
        f.start_redis()
        upstream = f.start("demo-upstream", "--latency", "0", "--chunk-delay", "0")
        specs = f.hub_specs(upstream.url, workers, id_prefix=f"{run}-w")
        started = await asyncio.to_thread(f.start_many, specs)
        worker_svcs, stream = started[:-1], started[-1]
        keys = Keys(f.prefix)
        view = SSEPool()
        load = HoldLoad()
        redis = aioredis.Redis.from_url(f.env()["REDIS_URL"])
        http = httpx.AsyncClient(timeout=2.0, trust_env=False)
        samples: list[Sample] = []
        try:
            url = stream.url + STREAM_PATH + ("?delta=1" if delta else "")
            await view.start(url, 1, module="bench.viewclient", args=["--prefix", run])
            if view.ready < 1:
                raise RuntimeError("the view client did not connect")
            await load.open()
            targets = [
                [urlsplit(s.url).hostname or "127.0.0.1", urlsplit(s.url).port or 80]
                for s in worker_svcs
            ]
            meters = {
                "workers": CpuMeter([s.pid for s in worker_svcs]).start(),
                "stream": CpuMeter([stream.pid]).start(),
                "redis": CpuMeter([f.redis_pid]).start(),
                "upstream": CpuMeter([upstream.pid]).start(),
                "load + view": CpuMeter([load.pid, *view.pids]).start(),
            }
            params = {"targets": targets, "conns": conns, "rate": rate, "hold": hold, "run": run}
            await load.command("start " + _json(params))
            t0 = time.monotonic()
            ramp = conns / rate
            stop_at = t0 + ramp + steady_s
            tick = t0
            while time.monotonic() < stop_at:
                tick += SAMPLE_S
                await asyncio.sleep(max(0.0, tick - time.monotonic()))
                samples.append(await _sample(load, view, redis, http, keys, worker_svcs, t0))
            await load.command(f"stop {hold[1] + 30}", timeout=hold[1] + 60)
            await asyncio.sleep(STALE_S + 1)  # the last removals reach the view
            cores = {role: m.stop().share for role, m in meters.items()}
            load_report = await load.command("report", timeout=60)
            view_report = (await view.command("report", timeout=60))[0]
            statuses = await _statuses(http, worker_svcs)
            redis_rows = sum(
                [int(await redis.hlen(keys.active(w))) for w in await _worker_ids(redis, keys)]
            )
        finally:
            await http.aclose()
            await redis.aclose()
            await view.close()
            await load.close()
    sent_at = load_report["sent"]
    done_at = load_report["done"]
    first, gone = view_report["first"], view_report["gone"]
    appear = [(first[i] - t) / 1e6 for i, t in sent_at.items() if i in first]
    removed = [(gone[i] - done_at[i]) / 1e6 for i in done_at if i in gone and i in first]
    never_seen = sum(1 for i in sent_at if i not in first)
    never_gone = sum(1 for i in done_at if i in first and i not in gone)
    ghosts = sum(1 for k in first if k not in sent_at)
    for sample in samples:
        stale_ns = sample.now_ns - int(STALE_S * 1e9)
        sample.stale_extra = sum(
            1 for i in sample.extra_ids if i not in sent_at or done_at.get(i, stale_ns) < stale_ns
        )
        sample.extra_ids = []
    client = view_report["clients"][0]
    final_ok = client["rows"] == 0 and redis_rows == 0
    detail = f"view holds {client['rows']} rows, Redis {redis_rows}, after every request ended"
    reap_lines = [line for line in stream.notable if "reaped worker" in line]
    # What the workers complained about, counted by message (timestamps and ids dropped).
    kinds = collections.Counter(
        re.sub(r"[0-9a-f]{6,}|\d+", "#", line.split(": ", 1)[-1])[:90]
        for s in worker_svcs
        for line in s.notable
    )
    worker_notable = [f"workers logged {n}x: {text}" for text, n in kinds.most_common(6)]
    dropped = {
        str(s.get("worker_id", f"worker {i + 1}")): int(s.get("events_dropped", -1))
        for i, s in enumerate(statuses)
    }
    return FidelityResult(
        workers=workers,
        conns=conns,
        hold=hold,
        samples=samples,
        appear_ms=appear,
        gone_ms=removed,
        never_seen=never_seen,
        never_gone=never_gone,
        ghosts=ghosts,
        requests=len(sent_at),
        errors=int(load_report["errors"]),
        reasons=dict(load_report.get("reasons", {})),
        connect_errors=int(load_report["connect_errors"]),
        reaped=len(reap_lines),
        workers_lost=len(client["workers_lost"]),
        reap_lines=reap_lines[:5],
        dropped=dropped,
        worker_notable=worker_notable,
        final_ok=final_ok,
        final_detail=detail,
        cores=cores,
        delta=delta,
        peak_truth=max((s.truth for s in samples), default=0),
    )


def _json(obj: Any) -> str:
    return orjson.dumps(obj).decode()


async def _worker_ids(redis: aioredis.Redis, keys: Keys) -> list[str]:
    return [w.decode() if isinstance(w, bytes) else w for w in await redis.hkeys(keys.workers)]


async def _statuses(http: httpx.AsyncClient, services: list[Any]) -> list[dict[str, Any]]:
    async def one(url: str) -> dict[str, Any]:
        # How long the worker takes to answer is its event loop's lag, near enough: the
        # endpoint does no work beyond reading a few counters.
        t0 = time.monotonic()
        try:
            answer = await http.get(url + "/_vdm/status")
            body: dict[str, Any] = answer.json()
        except (httpx.HTTPError, ValueError):
            body = {"failed": True}
        body["answer_ms"] = (time.monotonic() - t0) * 1000
        return body

    return list(await asyncio.gather(*(one(s.url) for s in services)))


async def _sample(
    load: HoldLoad,
    view: SSEPool,
    redis: aioredis.Redis,
    http: httpx.AsyncClient,
    keys: Keys,
    workers: list[Any],
    t0: float,
) -> Sample:
    truth_a, view_a, statuses = await asyncio.gather(
        load.command("sample"), view.command("sample"), _statuses(http, workers)
    )
    ids = await _worker_ids(redis, keys)
    redis_rows = sum([int(await redis.hlen(keys.active(w))) for w in ids])
    now_ns = truth_a["t"]
    truth = set(truth_a["ids"])
    shown = set(view_a[0]["keys"])
    missing = truth - shown
    extra = shown - truth
    sent = truth_a["ids"]
    stale_missing = sum(1 for i in missing if (now_ns - sent[i]) / 1e9 > STALE_S)
    per = truth_a["per_target"]
    return Sample(
        t=time.monotonic() - t0,
        truth=len(truth),
        view=len(shown),
        redis=redis_rows,
        missing=len(missing),
        extra=len(extra),
        stale_missing=stale_missing,
        stale_extra=0,  # filled in after the run, from the load's end stamps
        extra_ids=sorted(extra),
        now_ns=now_ns,
        load_per_worker=[int(per.get(str(i), 0)) for i in range(len(workers))],
        worker_in_flight=[int(s.get("in_flight", -1)) for s in statuses],
        status_ms=[float(s["answer_ms"]) for s in statuses],
    )
