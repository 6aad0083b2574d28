"""A minimal Redis connection for the publisher's one hot command (EVALSHA of ``apply``).

Deliberate deviation from "use redis-py everywhere": redis-py 8's asyncio client costs the
worker ~110 us of CPU per command (event dispatch, maintenance-notification hooks, pool
bookkeeping, per-argument packing), a raw stream ~20 us. The worker proxies on the same core,
so each flush showed up directly in its throughput (measured in docs/performance.md). This
speaks just enough RESP2 for one command at a time — integer, status and error replies — and
is only used for a plain TCP ``redis://`` client in standalone mode; anything else (TLS, unix
sockets, test doubles, Redis Cluster, Sentinel: those need redis-py's topology handling, slot
routing and master discovery) keeps going through redis-py. Any failure closes the connection
(its state is unknown) and raises a redis-py exception, so callers handle both paths alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def pack(args: Sequence[bytes | str | int]) -> bytes:
    """One RESP command (an array of bulk strings), byte-identical to redis-py's packing."""
    out = [b"*%d\r\n" % len(args)]
    append = out.append
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            data = str(arg).encode()
        # Three parts, not one formatted string: a batch's events JSON can be 100 KB, and
        # formatting would copy it once more before the join.
        append(b"$%d\r\n" % len(data))
        append(data)
        append(b"\r\n")
    return b"".join(out)


class RawRedis:
    """One lazily opened connection; ``call`` sends a packed command and returns its reply."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 1.0,
        connect_timeout: float = 1.0,
    ) -> None:
        self.host, self.port, self.db = host, port, db
        self.username, self.password = username, password
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def like(cls, client: aioredis.Redis) -> RawRedis | None:
        """A raw twin of ``client``'s connection settings, or None when it is not plain TCP
        to one standalone server (a cluster client has no single pool; a sentinel pool's
        connection class is not ``Connection``)."""
        if not isinstance(client, aioredis.Redis):
            return None
        pool = client.connection_pool
        if pool.connection_class is not Connection:
            return None
        kw: dict[str, Any] = pool.connection_kwargs
        host, port = kw.get("host"), kw.get("port")
        if not isinstance(host, str) or not isinstance(port, int):
            return None
        return cls(
            host,
            port,
            db=int(kw.get("db") or 0),
            username=kw.get("username"),
            password=kw.get("password"),
            timeout=kw.get("socket_timeout") or 1.0,
            connect_timeout=kw.get("socket_connect_timeout") or 1.0,
        )

    async def call(self, packed: bytes) -> Any:
        async with self._lock:
            try:
                async with asyncio.timeout(self.timeout):
                    if self._writer is None:
                        await self._connect()
                    return await self._roundtrip(packed)
            except TimeoutError as exc:
                self.close()
                raise RedisTimeoutError("timed out talking to Redis") from exc
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                # IncompleteReadError: Redis closed the connection mid-reply (a restart).
                self.close()
                raise RedisConnectionError(f"Redis connection failed: {exc!r}") from exc
            except ResponseError:
                raise  # a reply; the connection is fine
            except BaseException:
                self.close()  # cancelled mid-command, or a protocol error: state unknown
                raise

    async def _connect(self) -> None:
        async with asyncio.timeout(self.connect_timeout):
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        if self.password is not None:
            user = [self.username] if self.username else []
            await self._roundtrip(pack(["AUTH", *user, self.password]))
        if self.db:
            await self._roundtrip(pack(["SELECT", self.db]))

    async def _roundtrip(self, packed: bytes) -> Any:
        assert self._reader is not None and self._writer is not None
        self._writer.write(packed)
        line = await self._reader.readuntil(b"\r\n")
        kind, body = line[:1], line[1:-2]
        if kind == b":":
            return int(body)
        if kind == b"+":
            return body
        if kind == b"-":
            text = body.decode(errors="replace")
            if text.startswith("NOSCRIPT"):
                raise NoScriptError(text)
            if text.startswith("READONLY"):
                # A demoted master (failover behind a managed endpoint): not a data error;
                # the caller closes this connection and the next one finds the new master.
                raise RedisConnectionError(f"Redis answered {text[:60]}")
            raise ResponseError(text)
        raise RedisConnectionError(f"unexpected Redis reply {line[:40]!r}")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
