"""Prototype: one fleet spread over a Redis Cluster's shards, against today's one-slot layout.

Today every key of a fleet carries one hash tag (``VDM_KEY_PREFIX={vdm}``), so in a cluster the
whole fleet lives in one slot, on one master: the cluster adds failover, not capacity. And the
notice channel is classic pub/sub, which a cluster broadcasts to every node over its bus.

The design measured here (``docs/scaling.md``) gives each worker one of N event shards, chosen
from its id; a shard's keys share the hash tag ``{P:s}`` (its workers' active hashes, its own
seq, alive, workers and completed keys) and its notices go out with SPUBLISH on ``{P:s}:events``,
which a cluster delivers within the shard's node only. A worker's batch stays ONE atomic script
call (all of its keys in one slot, SPUBLISH included: Redis 7 allows it in a script whose keys
share the channel's slot). A stream service SSUBSCRIBEs to the N channels (one connection per
node) and reads each shard's hashes to resync.

This scenario starts a real 3-master cluster (``tests/system/redis_topology.py``), drives the
same offered load through both layouts, each batch the shape of a worker's (rows set and
deleted, finished requests added to a capped stream, the liveness deadline pushed from Redis's
clock, one notice), while one reader subscribes the way a stream service would and counts what
it receives. It reports, per master, the share of commands and of CPU, and Redis CPU per event.
The scripts are a prototype of the layout, not the production ``apply.lua``: they carry the
same Redis work per event, without the epoch checks.
"""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
from dataclasses import dataclass

import orjson
import redis
from redis.asyncio.cluster import RedisCluster as AsyncCluster
from redis.cluster import RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from bench.report import Result, Table, Verdict

PREFIX = "vdm"
COMPLETED_MAXLEN = 10_000

# KEYS: 1 seq  2 active:{worker}  3 completed  4 alive  5 notice channel
# ARGV: 1 worker  2 notice  3 n_set, pairs...  then n_del, ids...  (each deleted id also
#       becomes a completed entry, as a finished request does)
APPLY = """
local i = 3
local n_set = tonumber(ARGV[i]); i = i + 1
for _ = 1, n_set do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]); i = i + 2 end
local n_del = tonumber(ARGV[i]); i = i + 1
for _ = 1, n_del do
  redis.call('HDEL', KEYS[2], ARGV[i])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', '%d', '*', 'request_id', ARGV[i],
             'worker_id', ARGV[1], 'outcome', 'ok', 'duration_ms', '1200.5')
  i = i + 1
end
local seq = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
local t = redis.call('TIME')
redis.call('ZADD', KEYS[4], t[1] * 1000 + 10000, ARGV[1])
redis.call('%s', KEYS[5], ARGV[2])
return seq
"""


def spaced_tags(prefix: str, shards: int) -> list[str]:
    """One hash tag per shard, shard s's in the s-th of ``shards`` equal ranges of slots.

    A cluster gives each master a contiguous range of slots, so tags spread evenly over the
    slot space spread evenly over the masters, whatever their number (up to ``shards``).
    Every worker and stream service computes the same table from the prefix alone.
    """
    tags = []
    width = REDIS_CLUSTER_HASH_SLOTS / shards
    for s in range(shards):
        k = 0
        while int(key_slot(f"{prefix}:{k}".encode()) // width) != s:
            k += 1
        tags.append(f"{{{prefix}:{k}}}")
    return tags


@dataclass(frozen=True)
class Layout:
    name: str
    shards: int  # 0: today's one hash tag for the whole fleet

    def tag(self, worker: str) -> str:
        if not self.shards:
            return f"{{{PREFIX}}}"
        return _tags(self.shards)[zlib.crc32(worker.encode()) % self.shards]

    def keys(self, worker: str) -> list[str]:
        t = self.tag(worker)
        return [f"{t}:seq", f"{t}:active:{worker}", f"{t}:completed", f"{t}:alive", f"{t}:events"]

    def channels(self, workers: list[str]) -> list[str]:
        return sorted({self.keys(w)[4] for w in workers})

    @property
    def publish(self) -> str:
        return "SPUBLISH" if self.shards else "PUBLISH"


_TAGS: dict[int, list[str]] = {}


def _tags(shards: int) -> list[str]:
    if shards not in _TAGS:
        _TAGS[shards] = spaced_tags(PREFIX, shards)
    return _TAGS[shards]


@dataclass
class NodeLoad:
    address: str
    commands: int
    cpu_s: float


def node_stats(nodes: list[tuple[str, int]]) -> dict[str, tuple[int, float]]:
    out = {}
    for host, port in nodes:
        with redis.Redis(host=host, port=port) as c:
            info = c.info()
            cpu = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
            out[f"{host}:{port}"] = (int(info["total_commands_processed"]), cpu)
    return out


class Reader(threading.Thread):
    """Subscribes as a stream service would and counts the notices and events it receives."""

    def __init__(self, host: str, port: int, layout: Layout, channels: list[str]) -> None:
        super().__init__(daemon=True)
        self.client = RedisCluster(host=host, port=port)
        self.pubsub = self.client.pubsub()
        self.layout = layout
        self.channels = channels
        self.stop = threading.Event()
        self.subscribed = threading.Event()
        self.notices = 0
        self.events = 0

    def run(self) -> None:
        try:
            sharded = bool(self.layout.shards)
            if sharded:
                self.pubsub.ssubscribe(*self.channels)
            else:
                self.pubsub.subscribe(*self.channels)
            self.subscribed.set()
            while not self.stop.is_set():
                if sharded:  # redis-py leaves this one untyped
                    msg = self.pubsub.get_sharded_message(  # type: ignore[no-untyped-call]
                        ignore_subscribe_messages=True, timeout=0.05
                    )
                else:
                    msg = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
                if msg is not None:
                    self.notices += 1
                    self.events += len(orjson.loads(msg["data"])["events"])
        finally:
            self.pubsub.close()
            self.client.close()


async def drive(
    host: str, port: int, layout: Layout, workers: list[str], seconds: float, batch: int
) -> int:
    """Every worker sends a batch every BATCH_EVERY seconds: half starts, half ends."""
    client = AsyncCluster(host=host, port=port)
    script = client.register_script(APPLY % (COMPLETED_MAXLEN, layout.publish))
    row = orjson.dumps({"model": "gpt-4o", "path": "/v1/chat/completions", "bytes_out": 0})
    sent = 0
    try:

        async def one(worker: str) -> None:
            nonlocal sent
            keys = layout.keys(worker)
            live: list[str] = []
            n = 0
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                starts = [f"{worker}-{n + i}" for i in range(batch // 2)]
                n += len(starts)
                ends, live = live, starts
                events = [{"type": "start", "request_id": r} for r in starts]
                events += [{"type": "end", "request_id": r} for r in ends]
                notice = orjson.dumps({"v": 1, "worker_id": worker, "events": events})
                args: list[str | bytes | int] = [worker, notice, len(starts)]
                for r in starts:
                    args += [r, row]
                args += [len(ends), *ends]
                await script(keys=keys, args=args)
                sent += len(events)
                await asyncio.sleep(BATCH_EVERY)

        await asyncio.gather(*(one(w) for w in workers))
    finally:
        await client.aclose()
    return sent


BATCH_EVERY = 0.01


async def measure(
    nodes: list[tuple[str, int]], layout: Layout, workers: int, seconds: float, batch: int
) -> tuple[list[NodeLoad], int, int, float]:
    ids = [f"w{i:03d}" for i in range(workers)]
    host, port = nodes[0]
    reader = Reader(host, port, layout, layout.channels(ids))
    reader.start()
    await asyncio.to_thread(reader.subscribed.wait, 10)
    before = node_stats(nodes)
    t0 = time.monotonic()
    sent = await drive(host, port, layout, ids, seconds, batch)
    took = time.monotonic() - t0
    # The reader drains what is in flight (bounded), then stops.
    deadline = time.monotonic() + 5
    while reader.events < sent and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    after = node_stats(nodes)
    reader.stop.set()
    await asyncio.to_thread(reader.join, 5)
    loads = [
        NodeLoad(addr, after[addr][0] - before[addr][0], after[addr][1] - before[addr][1])
        for addr in before
    ]
    return loads, sent, reader.events, took


async def cluster_shards(quick: bool) -> Result:
    from tests.system.redis_topology import redis_cluster  # dev tree only (pytest helpers)

    result = Result("shards", "10. One fleet over a Redis Cluster's shards (prototype)")
    workers, seconds, batch = (24, 3.0, 4) if quick else (96, 10.0, 4)
    layouts = [Layout("one slot (today, {vdm})", 0), Layout("24 event shards", 24)]
    table = Table(
        f"3-master cluster, {workers} synthetic workers, a {batch}-event batch each every "
        f"{BATCH_EVERY * 1000:.0f} ms",
        ["layout", "events/s", "received", "master", "commands %", "CPU %", "Redis CPU µs/event"],
    )
    with redis_cluster() as cluster:
        nodes = [(n.host, n.port) for n in cluster.nodes]
        for layout in layouts:
            loads, sent, received, took = await measure(nodes, layout, workers, seconds, batch)
            total_cmd = sum(n.commands for n in loads) or 1
            total_cpu = sum(n.cpu_s for n in loads) or 1e-9
            for i, node in enumerate(sorted(loads, key=lambda n: -n.commands)):
                table.add(
                    layout.name if i == 0 else "",
                    f"{sent / took:,.0f}" if i == 0 else "",
                    f"{received / max(sent, 1):.1%}" if i == 0 else "",
                    f"#{i + 1}",
                    f"{100 * node.commands / total_cmd:.0f}",
                    f"{100 * node.cpu_s / total_cpu:.0f}",
                    f"{1e6 * node.cpu_s / max(sent, 1):.1f}",
                )
            result.verdicts.append(
                Verdict(
                    f"{layout.name}: busiest master's share of Redis CPU",
                    f"{100 * max(n.cpu_s for n in loads) / total_cpu:.0f}% "
                    f"({1e6 * total_cpu / max(sent, 1):.1f} µs of Redis CPU per event in all)",
                    None,
                )
            )
    result.tables.append(table)
    result.notes.append(
        "Commands include the cluster's own (PING on the bus is not counted; CLUSTER and INFO "
        "calls of the clients are). CPU is used_cpu_user+sys of each master over the run."
    )
    return result
