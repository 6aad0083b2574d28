"""Event throughput: publishers driven directly, and one hub ingesting from several of them.

A publisher process (``python -m bench.events REDIS_URL PREFIX WORKER_ID SECONDS RATE``) runs
one :class:`~services.proxy.publisher.Publisher` with a synthetic request mix: each request is
a ``start``, one ``progress`` (first byte) and, once ``WINDOW`` newer requests have started, an
``end`` (3 events per request; the window keeps rows in the hash as a real worker would). It
paces itself to ``RATE`` events/s (0: as fast as it can without overflowing the publisher's
queue) and prints one JSON line: events queued and sent, dropped, seconds, CPU seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis

from bench.fanout import make_row, pinned_self
from bench.procs import CPUS, ROOT, CpuMeter, cpu_seconds, fleet
from vdm_hub.services.proxy.publisher import Publisher
from vdm_hub.shared.schema import Outcome, Phase
from vdm_hub.shared.settings import Settings

WINDOW = 100  # requests in flight per publisher
HIGH_WATER = 4000  # queued events above which the generator yields to the flusher
STEP = 200  # requests generated between yields


async def publish(redis_url: str, prefix: str, worker_id: str, seconds: float, rate: float) -> Any:
    settings = Settings(redis_url=redis_url, key_prefix=prefix, worker_id=worker_id)
    pub = Publisher(settings)
    await pub.start_background()
    async with asyncio.timeout(10):
        await pub.wait_registered()
    live: deque[str] = deque()
    made = 0
    n = 0
    t0 = time.monotonic()
    cpu0 = cpu_seconds(os.getpid())
    end_at = t0 + seconds
    max_queued = 0
    while (now := time.monotonic()) < end_at:
        max_queued = max(max_queued, pub.pending_events)
        if pub.pending_events > HIGH_WATER:  # back-pressure, as a real source cannot overflow it
            await asyncio.sleep(0.0005)
            continue
        # Paced on events that exist (sent or queued): a progress right after its start
        # merges into the pending start, so a request makes 2 or 3 events.
        produced = pub.events_sent + pub.pending_events
        budget = STEP if rate <= 0 else min(STEP, int(rate * (now - t0) - produced) // 2)
        if budget <= 0:
            await asyncio.sleep(0.001)
            continue
        for _ in range(budget):
            rid = f"{worker_id}-{n}"
            n += 1
            pub.start(make_row(rid, worker_id))
            pub.progress(rid, {"phase": Phase.STREAMING, "bytes_out": 120})
            live.append(rid)
            made += 2
            if len(live) > WINDOW:
                pub.end(
                    live.popleft(),
                    status=200,
                    outcome=Outcome.OK,
                    duration_ms=5.0,
                    bytes_out=512,
                    input_tokens=10,
                    output_tokens=20,
                )
                made += 1
        await asyncio.sleep(0)
    elapsed = time.monotonic() - t0
    sent_in_time = pub.events_sent
    # A final marker, for the hub's lag: the newest start of this publisher.
    pub.start(make_row(f"{worker_id}-last", worker_id))
    cpu = cpu_seconds(os.getpid()) - cpu0
    await pub.close(grace=5)
    return {
        "queued": made,
        "sent": sent_in_time,
        "dropped": pub.events_dropped,
        "seconds": elapsed,
        "cpu": cpu,
        "rows_left": len(live),
        "max_queued": max_queued,
    }


def main(argv: Sequence[str] | None = None) -> int:
    redis_url, prefix, worker_id, seconds, rate = list(sys.argv[1:] if argv is None else argv)
    import uvloop

    result = uvloop.run(publish(redis_url, prefix, worker_id, float(seconds), float(rate)))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


async def run_publishers(
    redis_url: str, prefix: str, count: int, seconds: float, rate: float
) -> list[dict[str, Any]]:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.events",
            redis_url,
            prefix,
            f"pub{i}",
            str(seconds),
            str(rate),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        for i in range(count)
    ]
    results = []
    async with asyncio.timeout(seconds + 60):
        for proc in procs:
            out, _ = await proc.communicate()
            results.append(orjson.loads(out.splitlines()[-1]))
    return results


@dataclass
class IngestResult:
    publishers: list[dict[str, Any]]
    offered: float  # events/s all publishers got into Redis together
    lag: list[float]  # vdm_hub_lag_seconds samples during the run
    # Bytes published but not yet read by the hub (Redis's output buffer for it plus its socket
    # receive queues), sampled with the lag: near zero means any lag was made before Redis, in
    # the publishers' queues; growing means the hub is behind.
    backlog: list[int]
    drain: float  # seconds after the publishers exited until the hub had applied everything
    hub_cores: float
    redis_cores: float


async def single_publisher(seconds: float) -> dict[str, Any]:
    with fleet(f"bench-p{int(time.time() * 1000) % 10**8}") as f:
        f.start_redis(cpus=[1] if CPUS >= 2 else None)
        with pinned_self([0] if CPUS >= 2 else list(range(CPUS))):
            # A child of a pinned process starts pinned to the same core.
            results = await run_publishers(f.env()["REDIS_URL"], f.prefix, 1, seconds, 0)
    return results[0]


async def hub_ingest(publishers: int, seconds: float, rate: float) -> IngestResult:
    with fleet(f"bench-h{int(time.time() * 1000) % 10**8}") as f:
        f.start_redis()
        stream = f.start("stream", env=f.env())
        meters = CpuMeter([stream.pid]).start(), CpuMeter([f.redis_pid]).start()
        lag: list[float] = []
        backlog: list[int] = []
        task = asyncio.create_task(
            run_publishers(f.env()["REDIS_URL"], f.prefix, publishers, seconds, rate / publishers)
        )
        redis = aioredis.Redis.from_url(f.env()["REDIS_URL"])
        async with httpx.AsyncClient(base_url=stream.url, timeout=5) as http, redis:
            while not task.done():
                response = await http.get("/metrics")
                for line in response.text.splitlines():
                    if line.startswith("vdm_hub_lag_seconds "):
                        lag.append(float(line.split()[1]))
                backlog.append(await _hub_backlog(redis, stream.pid))
                await asyncio.sleep(0.25)
            results = await task
            t_stop = time.monotonic()
            # Each publisher deregisters as it exits (a `worker_down` after its last batch),
            # so the hub has caught up once it knows no workers any more.
            drain = float("nan")
            while time.monotonic() - t_stop < 30:
                body = (await http.get("/metrics/active-requests")).content
                if b'"workers":[]' in body:
                    drain = time.monotonic() - t_stop
                    break
                await asyncio.sleep(0.05)
        hub, redis_cpu = (m.stop() for m in meters)
    offered = sum(r["sent"] / r["seconds"] for r in results)
    return IngestResult(results, offered, lag, backlog, drain, hub.share, redis_cpu.share)


async def _hub_backlog(redis: aioredis.Redis, hub_pid: int) -> int:
    """Bytes published to the hub that it has not read yet: what Redis still holds for its
    pub/sub connection (CLIENT LIST omem) plus what waits in the hub's socket receive queues."""
    clients: Any = await redis.client_list(_type="pubsub")
    return sum(int(c.get("omem", 0)) for c in clients) + receive_queued(hub_pid)


def receive_queued(pid: int) -> int:
    """Sum of the receive queues of ``pid``'s TCP sockets (/proc/net/tcp rx_queue, by inode)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines, None)  # header
            for line in lines:
                parts = line.split()
                if len(parts) > 9 and parts[9] in inodes:
                    total += int(parts[4].split(":")[1], 16)
    return total


if __name__ == "__main__":
    sys.exit(main())
