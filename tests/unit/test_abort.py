"""The generic abort, in process: a cancel reaches a Starlette ``StreamingResponse`` whichever
way its server lets it notice (a pending ``receive`` answering ``http.disconnect`` under ASGI
spec 2.3, a failing ``send`` under 2.4), and an app that notices neither is cancelled after the
grace. The response is cut (started) or answered with 499 (not started); outcome `cancelled`."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
from starlette.responses import StreamingResponse

from tests.unit.test_instrument import Recorded, _scope
from vdm_hub.services.proxy import abort as abort_module
from vdm_hub.services.proxy.cancel import CancelResult, InFlight
from vdm_hub.services.proxy.forward import ResponseAborted
from vdm_hub.services.proxy.instrument import RequestMetricsMiddleware


def streaming(closed: list[str]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        async def tokens() -> Any:
            try:
                while True:
                    yield b"data: t\n\n"
                    await asyncio.sleep(0.01)
            finally:
                closed.append("upstream closed")

        await StreamingResponse(tokens(), media_type="text/event-stream")(scope, receive, send)

    return app


async def _serve(app: Any, scope: Any, in_flight: InFlight, recorder: Recorded) -> list[Any]:
    sent: list[Any] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"{}"}
        await asyncio.Event().wait()  # a client that stays
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    mw = RequestMetricsMiddleware(app, recorder, in_flight=in_flight, cancellable=True)
    task = asyncio.create_task(mw(scope, receive, send))
    async with asyncio.timeout(5):
        while not any(m.get("body") for m in sent):
            await asyncio.sleep(0)
    (request_id,) = in_flight._requests
    assert in_flight.cancel(request_id, "test") is CancelResult.ABORTED
    with pytest.raises(ResponseAborted):
        async with asyncio.timeout(5):
            await task
    return sent


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
async def test_a_streaming_response_stops_and_is_cut(spec: str) -> None:
    closed: list[str] = []
    recorder = Recorded()
    scope = {**_scope("/v1/chat/completions", b"{}"), "asgi": {"spec_version": spec}}
    sent = await _serve(streaming(closed), scope, InFlight(), recorder)
    # Under 2.4 the failed send ends Starlette's loop over the generator while it waits at a
    # yield: asyncio's async-generator finalizer closes it once it is dropped, as it does for
    # a client that disconnects.
    async with asyncio.timeout(5):
        while not closed:
            gc.collect()
            await asyncio.sleep(0)
    assert closed == ["upstream closed"]
    assert not any(m["type"] == "http.response.body" and not m.get("more_body") for m in sent)
    (end,) = recorder.of("end")
    assert end["outcome"] == "cancelled" and end["status"] == 200


async def test_an_app_that_notices_nothing_is_cancelled_after_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(abort_module, "ABORT_GRACE", 0.05)
    recorder = Recorded()
    in_flight = InFlight()
    sent: list[Any] = []
    stopped: list[str] = []
    waiting = asyncio.Event()

    async def deaf(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        waiting.set()
        try:
            await asyncio.sleep(60)  # awaiting a whole upstream answer
        finally:
            stopped.append("stopped")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    mw = RequestMetricsMiddleware(deaf, recorder, in_flight=in_flight, cancellable=True)
    task = asyncio.create_task(mw(_scope("/v1/messages", None), receive, send))
    async with asyncio.timeout(5):
        await waiting.wait()
        (request_id,) = in_flight._requests
        in_flight.cancel(request_id, "test")
        await task  # no exception: the cancel was ours, and the 499 went out
    assert stopped == ["stopped"] and not task.cancelled()
    assert sent[0]["status"] == 499 and b"cancelled" in sent[1]["body"]
    (end,) = recorder.of("end")
    assert (end["outcome"], end["status"]) == ("cancelled", 499)


async def test_a_server_shutdown_is_not_taken_for_a_cancel() -> None:
    recorder = Recorded()
    in_flight = InFlight()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await asyncio.sleep(60)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        pass

    mw = RequestMetricsMiddleware(slow, recorder, in_flight=in_flight, cancellable=True)
    task = asyncio.create_task(mw(_scope("/v1/messages", None), receive, send))
    async with asyncio.timeout(5):
        while not in_flight._requests:
            await asyncio.sleep(0)
        (request_id,) = in_flight._requests
        in_flight.cancel(request_id, "test")
        task.cancel()  # the server, at the same moment
        with pytest.raises(asyncio.CancelledError):
            await task
