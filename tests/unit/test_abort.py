"""The generic abort, in process: a cancel reaches a Starlette ``StreamingResponse`` whichever
way its server lets it notice (a pending ``receive`` answering ``http.disconnect`` under ASGI
spec 2.3, a failing ``send`` under 2.4), and an app that notices neither is cancelled after the
grace. The response is cut (started) or answered with 499 (not started); outcome `cancelled`."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Any

import pytest
from starlette.responses import StreamingResponse

from tests.unit.test_instrument import Recorded, _run, _scope
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


async def test_waiting_for_the_disconnect_takes_no_task_of_its_own() -> None:
    """Under ASGI 2.3 a StreamingResponse waits in receive() for the disconnect while it
    streams; a cancellable instrumentation interrupts that wait in place, without running it
    in a task of its own (one more task per streamed response, before)."""
    loop = asyncio.get_running_loop()
    created: list[str] = []
    factory = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        created.append(getattr(coro, "__qualname__", "?"))
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def finite(scope: Any, receive: Any, send: Any) -> None:
        async def tokens() -> Any:
            for _ in range(3):
                yield b"data: t\n\n"
                await asyncio.sleep(0)

        await StreamingResponse(tokens(), media_type="text/event-stream")(scope, receive, send)

    scope = {**_scope("/v1/chat/completions", b"{}"), "asgi": {"spec_version": "2.3"}}
    counts = []
    loop.set_task_factory(counting)
    try:
        for app in (finite, RequestMetricsMiddleware(finite, Recorded(), cancellable=True)):
            created.clear()
            await _run(app, dict(scope), [{"type": "http.request", "body": b"{}"}])
            counts.append(len(created))
    finally:
        loop.set_task_factory(factory)
    assert counts[0] > 0 and counts[1] == counts[0]


async def test_an_interrupted_wait_leaves_the_task_uncancelled_and_a_timeout_its_own() -> None:
    """The interruption is withdrawn where it is caught: the task goes on as if nothing had
    cancelled it, and a timeout that fires around the same receive() is still a timeout."""
    in_flight = InFlight()
    seen: list[object] = []
    started = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # the body
        started.set()
        seen.append((await receive())["type"])  # interrupted: a disconnect
        task = asyncio.current_task()
        assert task is not None
        seen.append(task.cancelling())
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await asyncio.sleep(1)

    mw = RequestMetricsMiddleware(app, Recorded(), in_flight=in_flight, cancellable=True)
    messages = [{"type": "http.request", "body": b"{}"}]
    run = asyncio.create_task(_run(mw, _scope("/v1/messages", b"{}"), messages))
    async with asyncio.timeout(5):
        await started.wait()
        await asyncio.sleep(0)  # the app now waits in its second receive()
        (request_id,) = in_flight._requests
        assert in_flight.cancel(request_id, "test") is CancelResult.ABORTED
        await run
    assert seen == ["http.disconnect", 0]


async def test_a_shutdown_at_the_moment_of_an_interrupt_still_cancels_the_task() -> None:
    """The interruption is taken back only when it is the task's sole cancellation: a server
    that cancels the request while the cancel interrupts its receive() still stops it."""
    in_flight = InFlight()
    started = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # the body
        started.set()
        await receive()  # waits for a disconnect

    mw = RequestMetricsMiddleware(app, Recorded(), in_flight=in_flight, cancellable=True)
    messages = [{"type": "http.request", "body": b"{}"}]
    run = asyncio.create_task(_run(mw, _scope("/v1/messages", b"{}"), messages))
    async with asyncio.timeout(5):
        await started.wait()
        await asyncio.sleep(0)  # the app now waits in its second receive()
        (request_id,) = in_flight._requests
        assert in_flight.cancel(request_id, "test") is CancelResult.ABORTED
        run.cancel()  # the server, at the same moment
        with pytest.raises(asyncio.CancelledError):
            await run
    assert run.cancelled()


async def test_a_receive_that_swallows_the_interrupt_leaves_no_cancellation_behind() -> None:
    """A server's receive() may catch the CancelledError itself and answer a disconnect; the
    interruption is taken back all the same, so the task is not left cancelling."""
    in_flight = InFlight()
    started = asyncio.Event()
    seen: list[object] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"{}"}
        with contextlib.suppress(asyncio.CancelledError):  # a server that swallows it
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        started.set()
        seen.append((await receive())["type"])
        task = asyncio.current_task()
        assert task is not None
        seen.append(task.cancelling())

    async def send(message: dict[str, Any]) -> None:
        pass

    mw = RequestMetricsMiddleware(app, Recorded(), in_flight=in_flight, cancellable=True)
    run = asyncio.create_task(mw(_scope("/v1/messages", b"{}"), receive, send))
    async with asyncio.timeout(5):
        await started.wait()
        await asyncio.sleep(0)
        (request_id,) = in_flight._requests
        assert in_flight.cancel(request_id, "test") is CancelResult.ABORTED
        await run  # answered with 499: the response had not begun
    assert seen == ["http.disconnect", 0]
