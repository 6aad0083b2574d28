"""What ``vdm-hub instrument`` costs vandamme-proxy per request, side by side in one run.

Two vandamme-proxy 2.0.9 processes (:class:`bench.peer.Vandamme`, ``vdm server start``) run in
front of one demo upstream that answers at once: ``bare``, and ``instrumented`` (the same
command under ``vdm-hub instrument``, publishing into Redis). With ``--baseline REF``
(:mod:`bench.baseline`) a third runs under ``vdm-hub instrument`` with commit REF's
``vdm_hub``: whether a change to the hot path paid off is answered in the same rounds. All are
pinned to the worker core and only one gets load at a time, in palindromic rounds (A B B A, or
A B C C B A: drift in the machine's background load falls on every side equally); each round
is a closed loop of keep-alive connections from :mod:`bench.httpload`, non-streaming chat
completions, then streaming ones (16 SSE chunks). Per round: vandamme's own CPU per request
(``utime + stime`` of its process, every thread included: the publisher's flushes and
heartbeats run in it), and for an instrumented side Redis's CPU per request, which is the
hub's cost but not vandamme's.
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

from bench import baseline
from bench.httpload import HTTPLoad
from bench.overhead import OTHER_CORE, WORKER_CORE, Rounds
from bench.peer import Vandamme
from bench.procs import CPUS, CpuMeter, fleet, pin
from bench.report import Result, Table, Verdict
from vdm_hub.shared.keys import Keys

SIDES = ("instrumented", "bare")
BASELINE = "baseline instrumented"
KINDS = ("json", "stream")
PATH = "/v1/chat/completions"


@dataclass
class CostResult:
    rounds: dict[str, Rounds]  # by kind: "json", "stream"
    failures: dict[str, dict[str, int]]  # by side: non-200 statuses ("lost": closed) -> count
    redis_us: dict[str, dict[str, list[float]]]  # Redis CPU per request, by side, then kind
    batches: dict[str, dict[str, float]]  # Lua batches per request, by side, then kind
    concurrency: int
    round_s: float
    baseline: str | None = None  # the baseline commit as git describes it, when there is one

    @property
    def sides(self) -> tuple[str, ...]:
        return SIDES if self.baseline is None else (SIDES[0], BASELINE, SIDES[1])


async def _round(
    load: HTTPLoad, url: str, concurrency: int, seconds: float, pids: list[int], stream: bool
) -> tuple[dict[str, Any], list[float]]:
    meters = [CpuMeter([pid]).start() for pid in pids]
    result = await load.run(url, concurrency, seconds, stream)
    used = [meter.stop().cpu / max(1, result["requests"]) * 1e6 for meter in meters]
    result["cpu_us"] = used[0]
    return result, used[1:]


async def vandamme_cost(
    *, concurrency: int, round_s: float, pairs: int, commit: str | None = None
) -> CostResult:
    """``commit``: also run that commit's ``vdm_hub`` instrumenting a third vandamme."""
    run = f"v{int(time.monotonic() * 1000) % 10**8}"
    pinning = CPUS >= 2
    other = OTHER_CORE if pinning else None
    with fleet(f"bench-{run}") as f, tempfile.TemporaryDirectory(prefix="vdm-cost-") as tmp:
        f.start_redis(cpus=other)
        upstream = f.start("demo-upstream", "--latency", "0", "--chunk-delay", "0", cpus=other)
        # Its packaged settings log every request at DEBUG: a production log level keeps its
        # own CPU per request lean, so the share measured for the hub is not flattered.
        lean = {"LOG_LEVEL": "WARNING"}
        hubs = {"instrumented": f.env(VDM_WORKER_ID=f"{run}-i")}
        sides = {
            "instrumented": Vandamme(
                upstream.url, Path(tmp, "i"), hold_ms=0, hub=hubs["instrumented"], extra=lean
            ),
            "bare": Vandamme(upstream.url, Path(tmp, "b"), hold_ms=0, extra=lean),
        }
        if commit is not None:
            old_root = baseline.checkout(commit, Path(tmp, "baseline"))
            hubs[BASELINE] = f.env(VDM_WORKER_ID=f"{run}-r")
            sides[BASELINE] = Vandamme(
                upstream.url, Path(tmp, "r"), hold_ms=0, hub=hubs[BASELINE], extra=lean,
                root=old_root,
            )  # fmt: skip
        load = await HTTPLoad().start(cpus=other)
        seq = redis.Redis.from_url(f.env()["REDIS_URL"])

        def applied(label: str) -> int:
            """Batches an instrumented side has applied in its epoch (its ``P:seq``)."""
            marker = seq.hget(Keys(f.prefix).seq, hubs[label]["VDM_WORKER_ID"])
            return int(marker.rsplit(b":", 1)[1]) if isinstance(marker, bytes) else 0

        try:
            for side in sides.values():
                await asyncio.to_thread(side.wait_ready, 120)
                pin(side.pid, WORKER_CORE if pinning else None)
            urls = {label: side.url + PATH for label, side in sides.items()}
            for url in urls.values():  # warm them all (pools, first-use imports), not counted
                for stream in (False, True):
                    await load.run(url, concurrency, min(1.0, round_s), stream)
            result = CostResult(
                {k: Rounds() for k in KINDS},
                {side: {} for side in sides},
                {label: {k: [] for k in KINDS} for label in hubs},
                {label: {} for label in hubs},
                concurrency,
                round_s,
                None if commit is None else baseline.describe(commit),
            )
            order = (*result.sides, *reversed(result.sides))
            for kind in KINDS:
                before = {label: applied(label) for label in hubs}
                requests = dict.fromkeys(hubs, 0)
                for _ in range(pairs):
                    for label in order:
                        pids = [sides[label].pid, f.redis_pid]
                        r, (redis_us,) = await _round(
                            load, urls[label], concurrency, round_s, pids, kind == "stream"
                        )
                        result.rounds[kind].add(label, r)
                        for why, n in r["failures"].items():
                            failed = result.failures[label]
                            failed[why] = failed.get(why, 0) + n
                        if label in hubs:
                            result.redis_us[label][kind].append(redis_us)
                            requests[label] += r["requests"]
                for label in hubs:
                    done = applied(label) - before[label]
                    result.batches[label][kind] = done / max(1, requests[label])
        finally:
            seq.close()
            await load.close()
            for side in sides.values():
                side.stop()
    return result


def _added(c: CostResult, kind: str, label: str) -> tuple[list[float], float]:
    """``label``'s added CPU per request over bare, per block (µs), and as a share of bare
    (median of the blocks' instrumented / bare - 1)."""
    r = c.rounds[kind]
    added = r.block_differences("cpu_us", label, "bare")
    return added, statistics.median(r.block_ratios("cpu_us", label, "bare")) - 1


async def instrumenting_vandamme(quick: bool) -> Result:
    """The ``vandamme`` scenario: its tables and the target (issue 19: <= 5% of vandamme's
    own CPU per request)."""
    result = Result("vandamme", "9. What vdm-hub instrument costs vandamme-proxy 2.0.9 per request")
    commit = baseline.ref()
    try:
        c = await vandamme_cost(
            concurrency=8, round_s=1.0 if quick else 3.0, pairs=1 if quick else 5, commit=commit
        )
    except RuntimeError as exc:  # vandamme could not be installed or started here
        result.notes.append(f"no measurement: {exc}")
        return result
    order = "A B C C B A" if c.baseline else "A B B A"
    rounds = Table(
        f"interleaved rounds ({order}), {c.round_s:g} s each, {c.concurrency} connections;"
        " every vandamme process pinned to core 1, one loaded at a time"
        + (f"; baseline: vdm_hub of {c.baseline}" if c.baseline else ""),
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
        f"added CPU per request: instrumented - bare, per {order} block",
        ["request", "side", "bare µs", "instrumented µs", "added µs (median, range)",
         "added / bare", "Lua batches/request", "Redis µs/request"],
    )  # fmt: skip
    instrumented = [label for label in c.sides if label != "bare"]
    for kind in KINDS:
        r = c.rounds[kind]
        for label in c.sides:
            rounds.add(kind, label, *r.cells(label))
        for label in instrumented:
            added, share = _added(c, kind, label)
            cost.add(
                kind,
                label,
                r.mean("cpu_us", "bare"),
                r.mean("cpu_us", label),
                f"{statistics.median(added):.0f} ({min(added):.0f} to {max(added):.0f})",
                f"{share:.1%}",
                f"{c.batches[label][kind]:.2f}",
                statistics.fmean(c.redis_us[label][kind]),
            )
        added, share = _added(c, kind, "instrumented")
        result.verdicts.append(
            Verdict(f"{kind}: instrumenting adds <= 5% of vandamme's CPU per request",
                    f"{share:.1%} ({statistics.median(added):+.0f} µs)", share <= 0.05)
        )  # fmt: skip
        if c.baseline:
            # Today's instrumented side against the baseline's, block by block.
            today = r.block_differences("cpu_us", "instrumented", BASELINE)
            result.verdicts.append(
                Verdict(f"{kind}: CPU per request, instrumented today - instrumented at "
                        f"{c.baseline} (same run)",
                        f"{statistics.median(today):+.0f} µs (blocks {min(today):+.0f} to "
                        f"{max(today):+.0f})", None)
            )  # fmt: skip
        if r.errors:
            result.notes.append(f"{kind}: {r.errors} requests failed")
    for side, failed in c.failures.items():
        if failed:
            result.notes.append(f"{side}: failed requests by status ('lost': closed) {failed}")
    result.tables += [rounds, cost]
    return result
