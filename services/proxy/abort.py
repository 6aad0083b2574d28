"""Stopping a request an operator cancelled, in any ASGI app, the way a client disconnect does.

A cancel reaches the request through :class:`services.proxy.cancel.InFlight`, which calls
``scope["vdm"]["abort"]``. An app may put its own there (the worker's reverse proxy drops the
upstream call); for any other app the instrumentation puts an :class:`Abort`, which:

1. at once makes the app's pending ``receive()`` and every later one answer
   ``http.disconnect``, and every later ``send()`` raise :class:`RequestCancelled` (an
   ``OSError``: what a server raises when the client has gone, ASGI spec 2.4). A Starlette
   ``StreamingResponse`` listens for the disconnect (spec 2.3 servers, Uvicorn) or sees the
   failed send (2.4), and stops: its body iterator is closed, and with it the upstream call;
2. after :data:`ABORT_GRACE`, cancels the request's task if the app is still running (an app
   that waits on something else and neither receives nor sends, e.g. an endpoint awaiting a
   whole upstream answer): its awaits raise ``CancelledError``, as on a server shutdown.

The middleware then ends the response (``RequestMetricsMiddleware``): a client still waiting
for the response head gets 499 with a JSON error, one whose response had begun has its
connection cut mid-response, never a clean end; the request ends with outcome ``cancelled``.

Only ``receive()`` calls made after the request body was read go through :meth:`Abort.receive`
(so a cancel can interrupt them): those are waits that only a disconnect would end. Reading
the body stays a plain call. The interruption cancels the task that waits in ``receive()``
and takes its own cancellation back (``Task.uncancel``) where it catches it, so nothing above
sees it; it used to run each such ``receive()`` in a task of its own, one more task per
streamed response (Starlette's ``StreamingResponse`` waits for the disconnect this way).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

# How long an app has to stop by itself (disconnect, failed send) before its task is
# cancelled: well inside the 2 s a cancel is given to cut the client off.
ABORT_GRACE = 1.0
# The message of the cancellation that interrupts a pending receive().
INTERRUPT = "vdm-hub: request cancelled by an operator"


class RequestCancelled(OSError):
    """``send()`` on a request an operator cancelled: the client's response is being cut."""


class Abort:
    """One request's abort hook (``scope["vdm"]["abort"]``); create it in the request's task."""

    __slots__ = ("forced", "interrupted", "receiving", "requested", "returned", "task", "timer")

    def __init__(self) -> None:
        self.task = asyncio.current_task()
        self.requested = False
        self.forced = False
        self.returned = False
        self.receiving: asyncio.Task[Any] | None = None  # the task waiting in receive()
        self.interrupted = False  # a cancellation was sent to it and not yet taken back
        self.timer: asyncio.TimerHandle | None = None

    def __call__(self) -> None:
        if self.requested or self.returned:
            return
        self.requested = True
        if self.receiving is not None:
            self.interrupted = True
            self.receiving.cancel(INTERRUPT)  # its receive() answers http.disconnect
        self.timer = asyncio.get_running_loop().call_later(ABORT_GRACE, self._force)

    def _force(self) -> None:
        self.timer = None
        if not self.returned and self.task is not None:
            self.forced = True
            self.task.cancel("cancelled by an operator")

    async def receive(self, receive: Callable[[], Awaitable[Any]]) -> Any | None:
        """The server's next message, or None once the request is cancelled."""
        if self.requested:
            return None
        task = self.receiving = asyncio.current_task()
        try:
            message = await receive()
        except asyncio.CancelledError:
            # Ours is taken back; if anything else cancelled the task too (a server shutting
            # down, a timeout around the call), that one goes on.
            if self._take_back(task):
                return None
            raise
        finally:
            self.receiving = None
        self._take_back(task)  # a receive() that swallowed the interruption
        return None if self.requested else message

    def _take_back(self, task: asyncio.Task[Any] | None) -> bool:
        """Withdraw the interruption sent to ``task``, if one was; True when no other
        cancellation of it is pending."""
        if not self.interrupted or task is None:
            return False
        self.interrupted = False
        return task.uncancel() == 0

    def app_returned(self) -> None:
        """The app is done (however): no more forcing, and a forced cancel is taken back."""
        self.returned = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.forced and self.task is not None and self.task.cancelling():
            self.task.uncancel()
