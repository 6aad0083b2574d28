"""Event throughput: publishers driven directly, and one hub ingesting from several of them.

A publisher process (``python -m bench.events REDIS_URL PREFIX WORKER_ID SECONDS RATE``) runs
one :class:`~services.proxy.publisher.Publisher` with a synthetic request mix: each request is
a ``start``, one ``progress`` (first byte) and, once ``WINDOW`` newer requests have started, an
``end`` (3 events per request; the window keeps rows in the hash as a real worker would). It
paces itself to ``RATE`` events/s (0: as fast as it can without overflowing the publisher's
queue) and prints one JSON line: events queued and sent, dropped, seconds, CPU seconds.

:func:`hub_ingest` measures one stream service (the hub) pinned alone on core 1 while the
publishers, Redis and the driver share core 0: the hub's CPU per event (its process CPU time
from the publishers' start until it has applied every batch and read every completed entry,
over the events published) and its lag. ``root`` runs another commit's stream service
(``bench/baseline.py``) in the same set-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis

from bench.fanout import make_row, pinned_self
from bench.procs import CPUS, ROOT, CpuMeter, cpu_seconds, fleet
from vdm_hub.services.proxy.publisher import Publisher
from vdm_hub.shared.schema import Outcome, Phase
from vdm_hub.shared.settings import Settings

HUB_CORE, LOAD_CORE = [1], [0]
WINDOW = 100  # requests in flight per publisher
HIGH_WATER = 4000  # queued events above which the generator yields to the flusher
STEP = 200  # requests generated between yields
COMPLETED_MAXLEN = 500_000


async def publish(redis_url: str, prefix: str, worker_id: str, seconds: float, rate: float) -> Any:
    # The completed stream holds every entry of a run (~100 MB at most), so a hub that falls
    # behind still reads, and pays for, every one: CPU per event compares like with like.
    settings = Settings(
        redis_url=redis_url,
        key_prefix=prefix,
        worker_id=worker_id,
        completed_maxlen=COMPLETED_MAXLEN,
    )
    pub = Publisher(settings)
    await pub.start_background()
    async with asyncio.timeout(10):
        await pub.wait_registered()
    # Registered: say so, and start when the driver says go (every publisher at once).
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await asyncio.to_thread(sys.stdin.readline)
    live: deque[str] = deque()
    made = 0
    ended = 0
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
                ended += 1
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
        "sent_total": pub.events_sent,  # with the queue flushed at the end and the marker
        "ended": ended,  # completed entries written
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
    redis_url: str,
    prefix: str,
    count: int,
    seconds: float,
    rate: float,
    on_go: Callable[[], None] = lambda: None,
) -> list[dict[str, Any]]:
    """Start ``count`` publisher processes, wait until all have registered, call ``on_go`` and
    let them all start at once; their results once they are done."""
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
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for i in range(count)
    ]
    results = []
    async with asyncio.timeout(seconds + 60):
        for proc in procs:
            assert proc.stdout is not None
            if await proc.stdout.readline() != b"ready\n":
                raise RuntimeError("a publisher exited before it registered")
        on_go()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
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
    # Completed entries the hub never read: the capped stream (VDM_COMPLETED_MAXLEN) dropped
    # them while the hub was behind.
    unread: int
    hub_cpu: float  # CPU seconds of the hub from the publishers' start until drained
    hub_cores: float  # while the publishers ran
    redis_cores: float

    @property
    def events(self) -> int:
        return sum(int(p.get("sent_total", p["sent"])) for p in self.publishers)

    @property
    def us_per_event(self) -> float:
        return self.hub_cpu / max(1, self.events) * 1e6

    def lag_thirds(self) -> tuple[float, float]:
        """Mean lag (s) of the first and the last third of the samples."""
        third = max(1, len(self.lag) // 3)
        return statistics.fmean(self.lag[:third] or [0]), statistics.fmean(self.lag[-third:] or [0])


async def single_publisher(seconds: float) -> dict[str, Any]:
    with fleet(f"bench-p{int(time.time() * 1000) % 10**8}") as f:
        f.start_redis(cpus=[1] if CPUS >= 2 else None)
        with pinned_self([0] if CPUS >= 2 else list(range(CPUS))):
            # A child of a pinned process starts pinned to the same core.
            results = await run_publishers(f.env()["REDIS_URL"], f.prefix, 1, seconds, 0)
    return results[0]


async def hub_ingest(
    publishers: int, seconds: float, rate: float, *, root: Path = ROOT
) -> IngestResult:
    """``publishers`` paced to ``rate`` events/s together (0: as fast as they go) into one hub
    pinned alone on core 1; Redis, the publishers and this driver share core 0."""
    pinning = CPUS >= 2
    with (
        fleet(f"bench-h{int(time.time() * 1000) % 10**8}") as f,
        pinned_self(LOAD_CORE if pinning else list(range(CPUS))),
    ):
        f.start_redis(cpus=LOAD_CORE if pinning else None)
        stream = f.start("stream", env=f.env(), cpus=HUB_CORE if pinning else None, root=root)
        meters: list[CpuMeter] = []
        cpu0: list[float] = []

        def go() -> None:  # the publishers start: so does the measurement
            cpu0.append(cpu_seconds(stream.pid))
            meters.extend([CpuMeter([stream.pid]).start(), CpuMeter([f.redis_pid]).start()])

        lag: list[float] = []
        backlog: list[int] = []
        task = asyncio.create_task(
            run_publishers(
                f.env()["REDIS_URL"], f.prefix, publishers, seconds, rate / publishers, go
            )
        )
        redis = aioredis.Redis.from_url(f.env()["REDIS_URL"])
        async with httpx.AsyncClient(base_url=stream.url, timeout=5) as http, redis:
            while not (await asyncio.wait({task}, timeout=0.25))[0]:
                if not meters:
                    continue  # the publishers are not publishing yet
                metrics = _metrics(await http.get("/metrics"))
                lag.append(metrics.get("vdm_hub_lag_seconds", math.nan))
                backlog.append(await _hub_backlog(redis, stream.pid))
            hub, redis_cpu = (m.stop() for m in meters)
            results = await task
            drain, unread = await _drained(http, sum(r["ended"] for r in results))
        hub_cpu = cpu_seconds(stream.pid) - cpu0[0]
    offered = sum(r["sent"] / r["seconds"] for r in results)
    return IngestResult(
        results, offered, lag, backlog, drain, unread, hub_cpu, hub.share, redis_cpu.share
    )


async def _drained(
    http: httpx.AsyncClient, completed: int, limit: float = 30.0
) -> tuple[float, int]:
    """Seconds until the hub has applied every batch and read every completed entry.

    Each publisher deregisters as it exits (a ``worker_down`` after its last batch), so the
    batches are in once the hub knows no workers any more; the completed entries once the
    finished-request counters add up to what the publishers ended, or (the capped stream
    dropped some the hub had not read yet) stop moving. Returns the seconds (NaN past
    ``limit``) and how many completed entries the hub never counted.
    """
    t0 = time.monotonic()
    counted, still = -1.0, 0
    while time.monotonic() - t0 < limit:
        body = (await http.get("/metrics/active-requests")).content
        now = _metrics(await http.get("/metrics")).get("vdm_requests_total", 0.0)
        still = still + 1 if now == counted else 0
        counted = now
        if b'"workers":[]' in body and (counted >= completed or still >= 3):
            return time.monotonic() - t0, completed - int(counted)
        await asyncio.sleep(0.2)
    return math.nan, completed - int(counted)


def _metrics(response: httpx.Response) -> dict[str, float]:
    """Prometheus text, each family's samples summed (labels dropped)."""
    out: dict[str, float] = {}
    for line in response.text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.partition("{")[0]
        out[name] = out.get(name, 0.0) + float(value)
    return out


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
