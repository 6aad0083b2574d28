"""The proxy's request target check and the public form of an upstream URL, at the ASGI level
(h11 passes targets through that httptools refuses itself, so the check must not rely on it)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from vdm_hub.services.proxy.forward import ReverseProxy, public_url, request_path


def _scope(raw_path: bytes, query: bytes = b"") -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": raw_path.decode("latin-1"),
        "raw_path": raw_path,
        "query_string": query,
        "headers": [(b"host", b"x")],
    }


@pytest.mark.parametrize(
    "raw", [b"@evil.example:80/x", b"//evil.example/x", b"http://evil/x", b"*", b"x/y", b""]
)
async def test_a_target_that_is_not_one_slash_and_a_path_gets_a_400(raw: bytes) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"nothing may be sent upstream, got {request.url}")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
        proxy = ReverseProxy("http://127.0.0.1:9", client)
        scope = _scope(raw)
        if not raw:
            scope["path"] = ""
        await proxy(scope, receive, send)
    assert sent[0]["status"] == 400
    assert orjson.loads(sent[1]["body"])["error"] == "bad_request_target"


async def test_the_host_stays_the_upstreams_whatever_the_path_holds() -> None:
    seen: list[httpx.URL] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, stream=httpx.ByteStream(b"ok"))

    async def send(message: dict[str, Any]) -> None:
        return None

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # a client that stays connected and sends no body
        raise AssertionError("unreachable")

    async with httpx.AsyncClient(transport=httpx.MockTransport(record)) as client:
        proxy = ReverseProxy("http://up.internal:8001/base/", client)
        for raw in (b"/@evil:80/x", b"/a%2Fb", b"/v1/chat/completions"):
            await proxy(_scope(raw, b"q=%40x"), receive, send)
    assert {(u.host, u.port) for u in seen} == {("up.internal", 8001)}
    assert [u.raw_path for u in seen] == [
        b"/base/@evil:80/x?q=%40x",
        b"/base/a%2Fb?q=%40x",
        b"/base/v1/chat/completions?q=%40x",
    ]


def test_request_path_keeps_the_query() -> None:
    assert request_path(_scope(b"/v1/x", b"a=1")) == b"/v1/x?a=1"
    assert request_path(_scope(b"//x")) is None


def test_public_url_drops_credentials_query_and_fragment() -> None:
    assert public_url("http://user:pw@h:8001/base?k=v#f") == "http://h:8001/base"
    assert public_url("https://:token@[::1]:443/") == "https://[::1]:443/"
    assert public_url("http://h:99999") == "http://h"
    assert public_url(None) == ""


def test_an_upstream_error_is_described_without_the_upstreams_credentials() -> None:
    proxy = ReverseProxy("http://svc:p%40ss-w0rd@up.internal:8001", httpx.AsyncClient())
    exc = httpx.ConnectError("cannot connect to http://svc:p%40ss-w0rd@up.internal:8001/x")
    text = proxy._describe(exc)
    assert "w0rd" not in proxy._describe(httpx.ConnectError("password p@ss-w0rd refused"))
    assert text.startswith("ConnectError: cannot connect to http://")
    assert "w0rd" not in text and "svc" not in text and "up.internal:8001/x" in text
    plain = ReverseProxy("http://up.internal:8001", httpx.AsyncClient())
    assert plain._describe(httpx.ReadError("")) == "ReadError"


async def test_the_row_has_its_model_even_when_the_upstream_is_slow_to_take_the_body() -> None:
    """The proxy reads the body's first part before it connects upstream, so the metrics
    middleware publishes the row with its model at once, not after its wait for the body
    runs out (a busy upstream pool used to make that wait run out first)."""
    from tests.unit.test_instrument import Recorded
    from vdm_hub.services.proxy.instrument import RequestMetricsMiddleware

    recorder = Recorded()
    upstream_may_read = asyncio.Event()

    class SlowUpstream(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            await upstream_may_read.wait()  # a connect or a pool slot that takes its time
            await request.aread()
            return httpx.Response(200, stream=httpx.ByteStream(b"{}"))

    body = orjson.dumps({"model": "m-slow", "stream": True})
    scope = _scope(b"/v1/chat/completions")
    scope["method"] = "POST"
    scope["headers"] += [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
    ]
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    client_stays = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await client_stays.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        return None

    async with httpx.AsyncClient(transport=SlowUpstream()) as client:
        app = RequestMetricsMiddleware(ReverseProxy("http://up.internal:8001", client), recorder)
        task = asyncio.create_task(app(scope, receive, send))
        try:
            async with asyncio.timeout(5):
                while not recorder.of("start"):
                    await asyncio.sleep(0.005)
            start = recorder.of("start")[0]
            assert start["model"] == "m-slow" and start["is_streaming"] is True
            assert not upstream_may_read.is_set()  # published before the upstream took the body
        finally:
            upstream_may_read.set()
            async with asyncio.timeout(5):
                await task
            client_stays.set()
