"""A minimal Redis connection for the publisher's one hot command (EVALSHA of ``apply``).

Deliberate deviation from "use redis-py everywhere": redis-py 8's asyncio client costs the
worker ~110 us of CPU per command (event dispatch, maintenance-notification hooks, pool
bookkeeping, per-argument packing), and even asyncio's streams (a ``StreamReader`` waiter,
an ``asyncio.timeout`` and a lock per call) cost ~40 us more than a bare protocol: the
worker proxies on the same core, so each flush showed up directly in its CPU per request
(measured in docs/performance.md). This speaks just enough RESP2 for one command at a time —
integer, status and error replies — over an ``asyncio.Protocol`` whose ``data_received``
hands the reply line straight to the caller's future, and is only used for a plain TCP
``redis://`` client in standalone mode; anything else (TLS, unix sockets, test doubles, Redis
Cluster, Sentinel: those need redis-py's topology handling, slot routing and master
discovery) keeps going through redis-py. Any failure closes the connection (its state is
unknown) and raises a redis-py exception, so callers handle both paths alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# A reply line longer than this is not one of the replies this connection expects.
MAX_REPLY_BYTES = 64 * 1024


def bulk(data: bytes) -> bytes:
    """One RESP bulk string. For small arguments: formatting copies ``data`` once more."""
    return b"$%d\r\n%b\r\n" % (len(data), data)


# Arguments longer than this are framed in three parts rather than formatted into one.
SMALL_ARG_BYTES = 256


def pack(args: Sequence[bytes | str | int]) -> bytes:
    """One RESP command (an array of bulk strings), byte-identical to redis-py's packing."""
    return b"".join([b"*%d\r\n" % len(args), *_bulks(args)])


def _bulks(args: Sequence[bytes | str | int]) -> list[bytes]:
    out: list[bytes] = []
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            data = str(arg).encode()
        if len(data) <= SMALL_ARG_BYTES:
            out.append(b"$%d\r\n%b\r\n" % (len(data), data))
        else:
            # Three parts, not one formatted string: a batch's events JSON can be 100 KB,
            # and formatting would copy it once more before the join.
            out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return out


class CommandHead:
    """A command's leading arguments, packed once for every call that starts with them (the
    publisher's EVALSHA, its script, keys, worker id and epoch: the same for a whole epoch)."""

    __slots__ = ("_count", "_packed")

    def __init__(self, args: Sequence[bytes | str | int]) -> None:
        self._count = len(args)
        self._packed = b"".join(_bulks(args))

    def pack(self, rest: Sequence[bytes | str | int]) -> bytes:
        """The whole command: the head, then ``rest``; the same bytes as :func:`pack`."""
        return b"".join([b"*%d\r\n" % (self._count + len(rest)), self._packed, *_bulks(rest)])


class _Replies(asyncio.Protocol):
    """The connection's reading side: each reply line completes the waiting call's future."""

    __slots__ = ("buffer", "lost", "transport", "waiter")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[bytes] | None = None
        self.buffer = b""
        self.lost: str | None = None  # why the connection is gone, once it is

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport (uvloop's is not a subclass of asyncio.Transport, only alike).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        end = buffer.find(b"\r\n")
        if end < 0:
            if len(buffer) > MAX_REPLY_BYTES:
                self._fail(f"reply line over {MAX_REPLY_BYTES} bytes")
            else:
                self.buffer = buffer
            return
        waiter, self.waiter = self.waiter, None
        if waiter is None or waiter.done() or end + 2 != len(buffer):
            # A reply nobody waits for (the call timed out), or more than one reply line:
            # whatever this connection holds now is not what the next call expects.
            self._fail(f"unexpected Redis reply {buffer[:40]!r}")
            return
        self.buffer = b""
        waiter.set_result(buffer[:end])

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost ({exc!r})" if exc else "Redis closed the connection")

    def _fail(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(RedisConnectionError(f"Redis connection failed: {why}"))
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[bytes]) -> None:
    if not waiter.done():
        waiter.set_exception(RedisTimeoutError("timed out talking to Redis"))


class RawRedis:
    """One lazily opened connection; ``call`` sends a packed command and returns its reply.

    One call at a time: the publisher has a single flusher (a second, concurrent call, which
    only a shutdown flush racing a flush task that ignored its cancellation could make, waits
    for the first)."""

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
        self._replies: _Replies | None = None
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
            replies = self._replies
            try:
                if replies is None or replies.lost is not None:
                    replies = await self._connect()
                return _parse(await self._roundtrip(replies, packed))
            except ResponseError:
                raise  # a reply; the connection is fine
            except BaseException:
                self.close()  # timed out, lost, cancelled mid-command, a protocol error
                raise

    async def _connect(self) -> _Replies:
        self.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, replies = await loop.create_connection(_Replies, self.host, self.port)
        except TimeoutError as exc:
            raise RedisTimeoutError("timed out connecting to Redis") from exc
        except OSError as exc:
            raise RedisConnectionError(f"Redis connection failed: {exc!r}") from exc
        self._replies = replies
        try:
            if self.password is not None:
                user = [self.username] if self.username else []
                _parse(await self._roundtrip(replies, pack(["AUTH", *user, self.password])))
            if self.db:
                _parse(await self._roundtrip(replies, pack(["SELECT", self.db])))
        except BaseException:
            self.close()  # not usable unauthenticated, nor on the wrong database
            raise
        return replies

    async def _roundtrip(self, replies: _Replies, packed: bytes) -> bytes:
        """Send one command and wait, bounded by the timeout, for its reply line."""
        assert replies.transport is not None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bytes] = loop.create_future()
        replies.waiter = waiter
        replies.transport.write(packed)
        # One timer handle, not an asyncio.timeout (a context manager and a task lookup).
        timer = loop.call_later(self.timeout, _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()

    def close(self) -> None:
        replies, self._replies = self._replies, None
        if replies is not None:
            replies.lost = replies.lost or "closed"
            if replies.transport is not None:
                replies.transport.close()


def _parse(line: bytes) -> Any:
    """An integer, status or error reply (the only kinds this connection's commands get)."""
    kind, body = line[:1], line[1:]
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
