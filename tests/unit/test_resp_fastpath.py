"""The publisher's raw apply call sends exactly what ``WireScripts.apply`` would."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from vdm_hub.services.proxy.publisher import Publisher
from vdm_hub.services.proxy.resp import RawRedis, pack
from vdm_hub.shared import schema
from vdm_hub.shared.settings import Settings


def test_pack_matches_redis_py() -> None:
    args: list[bytes | str | int] = [
        "EVALSHA",
        "ab" * 20,
        4,
        "p:seq",
        b'{"x":"\xc3\xa9"}',
        0,
        12,
        "é",
    ]
    assert pack(args) == b"".join(Connection().pack_command(*args))


async def test_apply_command_matches_wire_scripts(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.from_env({"VDM_KEY_PREFIX": "t", "VDM_WORKER_ID": "w1"})
    pub = Publisher(settings)
    assert pub._raw is not None  # a plain redis:// client gets the raw path
    pub.epoch = "e1"
    done = [
        schema.CompletedEntry(
            request_id="r1",
            worker_id="w1",
            model=None,
            method="POST",
            path="/v1/x",
            status=200,
            outcome="ok",
            start_time=1.5,
            duration_ms=2.25,
            input_tokens=3,
            output_tokens=None,
            bytes_out=10,
        )
    ]
    sets = [("r2", b'{"request_id":"r2"}')]
    captured: dict[str, Any] = {}
    sha = pub.scripts.apply_sha

    async def fake_apply(*, keys: list[Any], args: list[Any]) -> int:
        captured["cmd"] = ["EVALSHA", sha, len(keys), *keys, *args]
        return 1

    monkeypatch.setattr(pub.scripts, "_apply", fake_apply)
    prefix = schema.envelope_prefix("w1", "e1")
    maxlen = settings.completed_maxlen
    ttl = pub._ttl_ms()
    await pub.scripts.apply("w1", "e1", prefix, b"[]", sets, ["r3"], done, maxlen, ttl)
    assert pub._packed_apply(b"[]", sets, ["r3"], done) == pack(captured["cmd"])
    # Packed again for a new epoch (the head is kept per worker id and epoch).
    pub.epoch = "e2"
    await pub.scripts.apply("w1", "e2", schema.envelope_prefix("w1", "e2"), b"[1]", [], [], [],
                            maxlen, ttl)  # fmt: skip
    assert pub._packed_apply(b"[1]", [], [], []) == pack(captured["cmd"])
    await pub.redis.aclose()


def test_test_doubles_keep_redis_py(fake_redis: Any) -> None:
    assert RawRedis.like(fake_redis) is None


async def test_a_connection_closed_mid_reply_raises_a_redis_connection_error() -> None:
    """A Redis that hangs up (restart) must look like any lost connection to the flush loop,
    not escape as asyncio.IncompleteReadError and end it."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b":1")  # half a reply, then EOF
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    raw = RawRedis("127.0.0.1", port, timeout=2.0)
    try:
        with pytest.raises(RedisConnectionError):
            await raw.call(pack(["PING"]))
    finally:
        raw.close()
        server.close()
        await server.wait_closed()
