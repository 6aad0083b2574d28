"""Real Redis topologies on loopback for the cluster and sentinel tests: a 3-master Redis
Cluster, and a master + replica watched by three sentinels. Every process is an
:class:`EmbeddedRedis` (free ports, bounded start, always stopped); every wait is bounded.

Debian's ``redis-server``, ``redis-sentinel`` and ``redis-cli`` (``.ci/run`` installs them);
a test skips, saying so, only when a binary is missing.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from vdm_hub.shared.embedded_redis import EmbeddedRedis, find_redis_server, free_port

MASTER_NAME = "mymaster"


def _binaries() -> tuple[str, str]:
    server = find_redis_server()
    cli = shutil.which("redis-cli") or shutil.which("valkey-cli")
    if cli is None:
        pytest.skip("redis-cli not found (apt-get install redis-tools; .ci/run installs it)")
    return server, cli


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (Redis needs port <= 55535)."""
    import socket

    for _ in range(200):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except redis.RedisError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Cluster:
    """Three masters, no replicas, every slot assigned."""

    def __init__(self, nodes: list[EmbeddedRedis]) -> None:
        self.nodes = nodes

    def node_owning(self, key: str) -> EmbeddedRedis:
        with redis.Redis(host=self.nodes[0].host, port=self.nodes[0].port) as c:
            slot = int(c.execute_command("CLUSTER KEYSLOT", key))
            # redis-py parses CLUSTER NODES into {"host:port": {"slots": [[start, end]], ...}}
            for address, node in c.execute_command("CLUSTER NODES").items():
                if any(int(a) <= slot <= int(b) for a, b in node["slots"]):
                    port = int(address.rsplit(":", 1)[1].split("@", 1)[0])
                    return next(n for n in self.nodes if n.port == port)
        raise AssertionError(f"no node owns the slot of {key!r}")


@contextlib.contextmanager
def redis_cluster() -> Iterator[Cluster]:
    server, cli = _binaries()
    with contextlib.ExitStack() as stack:
        nodes: list[EmbeddedRedis] = []
        for _ in range(3):
            node = EmbeddedRedis(
                binary=server,
                port=_cluster_port(),
                extra_args=["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"],
            )
            stack.enter_context(node)
            nodes.append(node)
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"{n.host}:{n.port}" for n in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )

        def all_ok() -> bool:
            for n in nodes:
                with redis.Redis(host=n.host, port=n.port) as c:
                    if c.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                        return False
            return True

        _wait(all_ok, 20, "cluster_state:ok on every node")
        yield Cluster(nodes)


class Sentinels:
    """A master, its replica and three sentinels (quorum 2, down after 1 s)."""

    def __init__(
        self, master: EmbeddedRedis, replica: EmbeddedRedis, sentinels: list[EmbeddedRedis]
    ) -> None:
        self.master = master
        self.replica = replica
        self.sentinels = sentinels

    @property
    def addresses(self) -> str:
        return ",".join(f"{s.host}:{s.port}" for s in self.sentinels)

    def master_port(self) -> int:
        with redis.Redis(host=self.sentinels[0].host, port=self.sentinels[0].port) as c:
            _host, port = c.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
            return int(port)

    def wait_promoted(self, timeout: float) -> None:
        """Until every sentinel names the replica as the master."""

        def promoted() -> bool:
            for s in self.sentinels:
                with redis.Redis(host=s.host, port=s.port) as c:
                    addr = c.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
                    if int(addr[1]) != self.replica.port:
                        return False
            with redis.Redis(host=self.replica.host, port=self.replica.port) as c:
                return bool(c.info("replication")["role"] == "master")

        _wait(promoted, timeout, "the replica's promotion")


@contextlib.contextmanager
def sentinel_setup() -> Iterator[Sentinels]:
    server, _cli = _binaries()
    with contextlib.ExitStack() as stack:
        master = stack.enter_context(EmbeddedRedis(binary=server))
        replica = stack.enter_context(
            EmbeddedRedis(binary=server, extra_args=["--replicaof", master.host, str(master.port)])
        )
        conf_dir = Path(tempfile.mkdtemp(prefix="vdm-sentinel-"))
        stack.callback(shutil.rmtree, conf_dir, True)
        sentinels: list[EmbeddedRedis] = []
        for i in range(3):
            conf = conf_dir / f"sentinel-{i}.conf"  # sentinels rewrite their config: one each
            conf.write_text(
                f"sentinel monitor {MASTER_NAME} {master.host} {master.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            sentinel = EmbeddedRedis(
                binary=server, port=free_port(), config_file=str(conf), extra_args=["--sentinel"]
            )
            sentinels.append(stack.enter_context(sentinel))
        setup = Sentinels(master, replica, sentinels)

        def linked() -> bool:
            with redis.Redis(host=replica.host, port=replica.port) as c:
                if c.info("replication").get("master_link_status") != "up":
                    return False
            for s in sentinels:
                with redis.Redis(host=s.host, port=s.port) as c:
                    if len(c.execute_command("SENTINEL REPLICAS", MASTER_NAME)) != 1:
                        return False
                    if len(c.execute_command("SENTINEL SENTINELS", MASTER_NAME)) != 2:
                        return False
            return True

        # Sentinels find the replica and each other through hello messages (every 2 s).
        _wait(linked, 30, "the replica's link and the sentinels to know each other")
        yield setup
