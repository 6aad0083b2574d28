"""What ``vdm-hub instrument`` costs vandamme-proxy per request, side by side in one run.

Two vandamme-proxy 2.0.9 processes (:class:`bench.peer.Vandamme`, ``vdm server start``) run in
front of one demo upstream that answers at once: ``bare``, and ``instrumented`` (the same
command under ``vdm-hub instrument``, publishing into Redis). Both are pinned to the worker core
and only one gets load at a time, in rounds A B B A (drift in the machine's background load
falls on both equally); each round is a closed loop of keep-alive connections from
:mod:`bench.httpload`, non-streaming chat completions, then streaming ones (16 SSE chunks). Per
round: vandamme's own CPU per request (``utime + stime`` of its process, every thread
included: the publisher's flushes and heartbeats run in it), and for the instrumented side
Redis's CPU per request, which is the hub's cost but not vandamme's.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.httpload import HTTPLoad
from bench.overhead import OTHER_CORE, WORKER_CORE, Rounds
from bench.peer import Vandamme
from bench.procs import CPUS, CpuMeter, fleet, pin
from bench.report import Result, Table, Verdict
from vdm_hub.shared.keys import Keys

SIDES = ("instrumented", "bare")
KINDS = ("json", "stream")
PATH = "/v1/chat/completions"


@dataclass
class CostResult:
    rounds: dict[str, Rounds]  # by kind: "json", "stream"
    failures: dict[str, dict[str, int]]  # by side: non-200 statuses ("lost": closed) -> count
    redis_us: dict[str, list[float]]  # Redis CPU per instrumented request, by kind
    batches: dict[str, float]  # Lua batches per instrumented request, by kind
    concurrency: int
    round_s: float


async def _round(
    load: HTTPLoad, url: str, concurrency: int, seconds: float, pids: list[int], stream: bool
) -> tuple[dict[str, Any], list[float]]:
    meters = [CpuMeter([pid]).start() for pid in pids]
    result = await load.run(url, concurrency, seconds, stream)
    used = [meter.stop().cpu / max(1, result["requests"]) * 1e6 for meter in meters]
    result["cpu_us"] = used[0]
    return result, used[1:]


async def vandamme_cost(*, concurrency: int, round_s: float, pairs: int) -> CostResult:
    run = f"v{int(time.monotonic() * 1000) % 10**8}"
    pinning = CPUS >= 2
    other = OTHER_CORE if pinning else None
    with fleet(f"bench-{run}") as f, tempfile.TemporaryDirectory(prefix="vdm-cost-") as tmp:
        f.start_redis(cpus=other)
        upstream = f.start("demo-upstream", "--latency", "0", "--chunk-delay", "0", cpus=other)
        # Its packaged settings log every request at DEBUG: a production log level keeps its
        # own CPU per request lean, so the share measured for the hub is not flattered.
        lean = {"LOG_LEVEL": "WARNING"}
        hub = f.env(VDM_WORKER_ID=f"{run}-i")
        sides = {
            "instrumented": Vandamme(upstream.url, Path(tmp, "i"), hold_ms=0, hub=hub, extra=lean),
            "bare": Vandamme(upstream.url, Path(tmp, "b"), hold_ms=0, extra=lean),
        }
        load = await HTTPLoad().start(cpus=other)
        seq = redis.Redis.from_url(f.env()["REDIS_URL"])

        def applied() -> int:
            """Batches the instrumented side has applied in its epoch (its ``P:seq``)."""
            marker = seq.hget(Keys(f.prefix).seq, hub["VDM_WORKER_ID"])
            return int(marker.rsplit(b":", 1)[1]) if isinstance(marker, bytes) else 0

        try:
            for side in sides.values():
                await asyncio.to_thread(side.wait_ready, 120)
                pin(side.pid, WORKER_CORE if pinning else None)
            urls = {label: side.url + PATH for label, side in sides.items()}
            for url in urls.values():  # warm both (pools, first-use imports), not counted
                for stream in (False, True):
                    await load.run(url, concurrency, min(1.0, round_s), stream)
            result = CostResult(
                {k: Rounds() for k in KINDS},
                {side: {} for side in SIDES},
                {k: [] for k in KINDS},
                {},
                concurrency,
                round_s,
            )
            for kind in KINDS:
                batches_before, requests = applied(), 0
                for _ in range(pairs):
                    for label in ("instrumented", "bare", "bare", "instrumented"):
                        pids = [sides[label].pid, f.redis_pid]
                        r, (redis_us,) = await _round(
                            load, urls[label], concurrency, round_s, pids, kind == "stream"
                        )
                        result.rounds[kind].add(label, r)
                        for why, n in r["failures"].items():
                            failed = result.failures[label]
                            failed[why] = failed.get(why, 0) + n
                        if label == "instrumented":
                            result.redis_us[kind].append(redis_us)
                            requests += r["requests"]
                result.batches[kind] = (applied() - batches_before) / max(1, requests)
        finally:
            seq.close()
            await load.close()
            for side in sides.values():
                side.stop()
    return result


async def instrumenting_vandamme(quick: bool) -> Result:
    """The ``vandamme`` scenario: its tables and the target (issue 19: <= 5% of vandamme's
    own CPU per request)."""
    result = Result("vandamme", "9. What vdm-hub instrument costs vandamme-proxy 2.0.9 per request")
    try:
        c = await vandamme_cost(
            concurrency=8, round_s=1.0 if quick else 3.0, pairs=1 if quick else 5
        )
    except RuntimeError as exc:  # vandamme could not be installed or started here
        result.notes.append(f"no measurement: {exc}")
        return result
    rounds = Table(
        f"interleaved rounds (A B B A), {c.round_s:g} s each, {c.concurrency} connections;"
        " both vandamme processes pinned to core 1, one loaded at a time",
        [
            "request",
            "side",
            "rounds",
            "req/s (mean)",
            "p50 ms",
            "p99 ms",
            "vandamme µs CPU/request",
        ],
    )
    cost = Table(
        "added CPU per request: instrumented - bare, per A B B A block",
        ["request", "bare µs", "instrumented µs", "added µs (median, range)", "added / bare",
         "Lua batches/request", "Redis µs/request"],
    )  # fmt: skip
    for kind in KINDS:
        r = c.rounds[kind]
        for label in SIDES:
            rounds.add(kind, label, *r.cells(label))
        added = r.block_differences("cpu_us", "instrumented", "bare")
        # instrumented / bare - 1, per block: the added CPU as a share of vandamme's own.
        share = statistics.median(r.block_ratios("cpu_us", "instrumented", "bare")) - 1
        cost.add(
            kind,
            r.mean("cpu_us", "bare"),
            r.mean("cpu_us", "instrumented"),
            f"{statistics.median(added):.0f} ({min(added):.0f} to {max(added):.0f})",
            f"{share:.1%}",
            f"{c.batches[kind]:.2f}",
            statistics.fmean(c.redis_us[kind]),
        )
        result.verdicts.append(
            Verdict(f"{kind}: instrumenting adds <= 5% of vandamme's CPU per request",
                    f"{share:.1%} ({statistics.median(added):+.0f} µs)", share <= 0.05)
        )  # fmt: skip
        if r.errors:
            result.notes.append(f"{kind}: {r.errors} requests failed")
    for side, failed in c.failures.items():
        if failed:
            result.notes.append(f"{side}: failed requests by status ('lost': closed) {failed}")
    result.tables += [rounds, cost]
    return result
