"""The five scenarios of issue 6, each turning raw measurements into tables and verdicts."""

from __future__ import annotations

from bench.fanout import FanoutResult, fanout
from bench.latency import E2EResult, e2e
from bench.report import Result, Table, Verdict


def _e2e_row(table: Table, r: E2EResult) -> None:
    table.add(
        r.workers,
        r.clients,
        r.held,
        f"{r.probes} @ {r.probe_rate:.1f}/s",
        r.p50,
        r.p95,
        r.p99,
        r.max,
        f"{r.missed}/{r.pairs}",
        f"{r.cpu['stream']:.2f}",
        f"{r.cpu['workers']:.2f}",
        f"{r.cpu['redis']:.2f}",
        f"{r.cpu['sse clients']:.2f}",
    )


E2E_HEADERS = [
    "workers",
    "clients",
    "held",
    "probes",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "max ms",
    "missed",
    "stream cores",
    "workers cores",
    "redis cores",
    "client cores",
]


async def end_to_end(quick: bool) -> Result:
    result = Result("e2e", "1. End-to-end latency: request enters a worker -> row on SSE")
    r = await e2e(
        workers=4,
        clients=50 if quick else 200,
        held=50,
        probes=20 if quick else 150,
        spacing=0.1,
    )
    table = Table("request -> row in an update, per (probe, client) pair", E2E_HEADERS)
    _e2e_row(table, r)
    result.tables.append(table)
    result.verdicts += [
        Verdict("p50 <= 10 ms", f"{r.p50:.1f} ms", r.p50 <= 10),
        Verdict("p99 <= 50 ms", f"{r.p99:.1f} ms", r.p99 <= 50),
        Verdict("every client saw every probe", f"{r.missed} missed", r.missed == 0),
    ]
    return result


FANOUT_HEADERS = [
    "clients",
    "changes/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "missed",
    "final state ok",
    "RSS KB/client",
    "stream cores",
    "stream µs CPU per client-update",
    "client cores",
]


def _fanout_row(table: Table, r: FanoutResult) -> None:
    table.add(
        f"{r.connected}/{r.clients}",
        f"{r.rate:g}",
        r.p50,
        r.p95,
        r.p99,
        f"{r.missed}/{r.changes * r.connected}",
        f"{r.final_ok}/{r.connected}",
        r.rss_per_client_kb,
        f"{r.stream_cores:.2f}",
        r.stream_us_per_client_update,
        f"{r.client_cores:.2f}",
    )


async def fan_out(quick: bool) -> Result:
    result = Result("fanout", "2. Fan-out: one stream-service process, N SSE clients")
    table = Table("1 change/s, then 20 changes/s (stream service pinned to core 1)", FANOUT_HEADERS)
    sweep = [100, 300] if quick else [1000, 2500, 5000]
    slow: list[FanoutResult] = []
    for n in sweep:
        r = await fanout(clients=n, rate=1, changes=3 if quick else 8, client_procs=2)
        _fanout_row(table, r)
        slow.append(r)
    fast = await fanout(
        clients=200 if quick else 1000, rate=20, changes=40 if quick else 200, client_procs=2
    )
    _fanout_row(table, fast)
    result.tables.append(table)
    meeting = [r.connected for r in slow if r.p95 <= 250 and r.missed == 0]
    biggest = slow[-1]
    result.verdicts += [
        Verdict(
            f"{biggest.clients} clients at 1 change/s: p95 <= 250 ms, every client every update",
            f"p95 {biggest.p95:.0f} ms, {biggest.missed} missed",
            biggest.p95 <= 250 and biggest.missed == 0 and biggest.connected == biggest.clients,
        ),
        Verdict(
            "largest client count meeting p95 <= 250 ms (of those tried)",
            str(max(meeting) if meeting else "none"),
            None,
        ),
        Verdict(
            f"{fast.clients} clients at 20 changes/s: p95 <= 250 ms, all end on the right state",
            f"p95 {fast.p95:.0f} ms, {fast.final_ok}/{fast.connected} right",
            fast.p95 <= 250 and fast.final_ok == fast.connected == fast.clients,
        ),
        Verdict(
            "stream-service memory per client <= 50 KB",
            f"{max(r.rss_per_client_kb for r in [*slow, fast]):.1f} KB (worst run)",
            max(r.rss_per_client_kb for r in [*slow, fast]) <= 50,
        ),
        Verdict(
            "client processes are not the bottleneck (< 0.5 core)",
            f"{max(r.client_cores for r in [*slow, fast]):.2f} cores at most",
            None,
        ),
    ]
    return result


async def worker_overhead(quick: bool) -> Result:
    raise NotImplementedError


async def event_throughput(quick: bool) -> Result:
    raise NotImplementedError


async def scaling(quick: bool) -> Result:
    raise NotImplementedError
