"""Soak: every service's memory under sustained churn (memory must stay flat), bounded in time.

Requests start and end all the time (held 0.1-1 s, so rows churn through every worker's hash),
SSE clients connect, read their first update and leave again, and the RSS of Redis, the demo
upstream, each worker and the stream service is sampled every few seconds. Memory is judged
after a warm-up (allocator arenas, caches and the completed stream's cap fill first): a leak
shows as a steady slope, not as the first minute's growth.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from urllib.parse import urlsplit

from bench.procs import fleet, rss_kb
from bench.report import Result, Table, Verdict
from vdm_hub.services.demo.load import LoadGenerator

STREAM_PATH = b"/metrics/active-requests/stream"


async def _sse_churn(stream_url: str, stop: asyncio.Event, parallel: int = 20) -> int:
    """Clients that connect, wait for their first `update`, and disconnect, over and over."""
    parts = urlsplit(stream_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        b"GET " + STREAM_PATH + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
        b"Accept: text/event-stream\r\n\r\n"
    )
    sessions = 0

    async def one() -> None:
        nonlocal sessions
        while not stop.is_set():
            with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
                async with asyncio.timeout(5):
                    reader, writer = await asyncio.open_connection(host, port)
                    writer.write(request)
                    await reader.readuntil(b"event: update")
                    writer.close()
                    await writer.wait_closed()
                    sessions += 1
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(one()) for _ in range(parallel)]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return sessions


def _slope_kb_per_min(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    num = sum((t - mean_t) * (r - mean_r) for t, r in samples)
    den = sum((t - mean_t) ** 2 for t, _ in samples)
    return num / den * 60 if den else 0.0


async def soak(quick: bool) -> Result:
    duration = 15.0 if quick else 150.0
    warmup = duration * 0.3
    every = 1.0 if quick else 5.0
    result = Result("soak", "6. Soak: memory of every service under churn")
    with fleet(f"soak{uuid.uuid4().hex[:6]}") as f:
        f.start_redis()
        upstream = f.start("demo-upstream", "--latency", "0.01", "--chunk-delay", "0.005")
        env = f.env(VDM_COMPLETED_MAXLEN="2000")
        workers = f.start_many(
            [
                (
                    "worker",
                    ["--upstream", upstream.url],
                    {**env, "VDM_WORKER_ID": f"soak-{i}"},
                    None,
                )
                for i in (1, 2)
            ]
        )
        stream = f.start("stream", env={**env, "VDM_ACTIVE_REQUESTS_SSE_INTERVAL": "1"})
        watched = {"redis": f.redis_pid, "demo-upstream": upstream.pid, "stream": stream.pid}
        watched |= {f"worker {i}": w.pid for i, w in enumerate(workers, 1)}
        samples: dict[str, list[tuple[float, int]]] = {name: [] for name in watched}

        stop = asyncio.Event()
        gen = LoadGenerator(
            [w.url for w in workers],
            rate=0,
            concurrency=20,
            duration=None,
            stream_share=0.5,
            hold="0.1-1",
            shape="mixed",
        )
        churn = asyncio.create_task(_sse_churn(stream.url, stop))
        t0 = time.monotonic()
        async with gen:
            gen.start()
            while (elapsed := time.monotonic() - t0) < duration:
                for name, pid in watched.items():
                    samples[name].append((elapsed, rss_kb(pid)))
                await asyncio.sleep(every)
            stats = await gen.stop()
        stop.set()
        sessions = await churn

    table = Table(
        f"RSS over {duration:.0f} s of churn (after a {warmup:.0f} s warm-up)",
        ["process", "RSS after warm-up MB", "RSS at end MB", "growth MB", "slope KB/min"],
    )
    flat = True
    for name, series in samples.items():
        steady = [(t, r) for t, r in series if t >= warmup] or series
        first, last = steady[0][1], steady[-1][1]
        slope = _slope_kb_per_min(steady)
        # Flat: under 5% (or 4 MB) growth across the measured span.
        ok = last - first <= max(0.05 * first, 4096)
        flat = flat and ok
        table.add(name, first / 1024, last / 1024, (last - first) / 1024, slope)
    result.tables.append(table)
    result.notes.append(
        f"{stats.ok} requests completed ({stats.failed_total} failed), {sessions} SSE "
        "sessions opened and closed, 2 workers, completed stream capped at ~2,000 entries"
    )
    result.verdicts.append(
        Verdict("every service's memory stays flat under churn", "see table", flat)
    )
    return result
