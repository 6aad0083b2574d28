"""``vdm_hub.instrument(app)``: any ASGI app publishes its requests to the hub.

::

    import vdm_hub
    app = vdm_hub.instrument(app)   # reads REDIS_URL, VDM_WORKER_ID... (options win over them)

The wrapper owns the publisher's lifetime, so there is nothing else to call:

- it creates and starts the publisher in the process that serves, never at wrap time: an app
  imported by a pre-fork parent (``gunicorn --preload``) is wrapped there, and each child
  starts its own publisher, with its own Redis connections and worker id;
- when the server speaks the lifespan protocol, the publisher starts on ``lifespan.startup``
  and is closed (flushed, deregistered) after the app's own shutdown, before the server hears
  ``lifespan.shutdown.complete``. The lifespan goes on to the app as before; an app that does
  not speak it (it raises, or returns without answering) has the lifespan answered for it;
- a server that sends no lifespan: the publisher starts with the first request, and is closed
  as well as can be at interpreter exit (:meth:`Publisher.close_after_loop`).

Wrapping twice is harmless: ``instrument`` returns an instrumented app as it is, and an
instrumentation inside another (``scope["vdm"]`` set for a request, :data:`NESTED` for the
lifespan) passes everything on to its app.

Settings come from the environment through ``Settings.from_env`` (one source); options given
to ``instrument`` are the same settings by attribute name and win. A bad value raises
:class:`ConfigError` at wrap time, naming it. ``LOG_REQUEST_METRICS`` is not read here (it is
the embedding app's own switch in vandamme-proxy); ``VDM_INSTRUMENT=false`` turns the wrapping
off.
"""

from __future__ import annotations

import atexit
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vdm_hub.services.proxy.forward import quiet_deliberate_aborts
from vdm_hub.services.proxy.instrument import RequestMetricsMiddleware
from vdm_hub.services.proxy.publisher import Publisher
from vdm_hub.shared.settings import Settings

log = logging.getLogger("vdm.instrument")

# Put in a lifespan scope by the outermost instrumentation: one further in passes it on.
NESTED = "vdm_hub.instrumented"
_ENDS = frozenset(
    {"lifespan.startup.failed", "lifespan.shutdown.complete", "lifespan.shutdown.failed"}
)


def instrument(app: ASGIApp, **options: Any) -> ASGIApp:
    """``app``, wrapped so that every HTTP request it serves is published to the hub.

    ``options`` are settings by attribute name (``redis_url``, ``worker_id``, ``key_prefix``,
    ``worker_ttl``...) and win over the environment.
    """
    if isinstance(app, InstrumentedApp):
        return app
    settings = Settings.from_env(overrides=options)
    if not settings.instrument:
        log.info("VDM_INSTRUMENT=false: requests are not published")
        return app
    return InstrumentedApp(app, settings)


class InstrumentedApp:
    """An ASGI app that reports ``app``'s requests and owns the publisher; see the module doc."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.publisher: Publisher | None = None
        self._middleware: RequestMetricsMiddleware | None = None
        self._closed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" and "vdm" not in scope:
            await (self._middleware or self._start(lifespan=False))(scope, receive, send)
        elif kind == "lifespan" and NESTED not in scope:
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _start(self, *, lifespan: bool) -> RequestMetricsMiddleware:
        """Create and start the publisher (once; synchronous, so two first requests at once
        cannot both get here first)."""
        if self._middleware is None:
            quiet_deliberate_aborts()  # a cancelled stream is cut on purpose: no traceback
            self.publisher = Publisher(self.settings)
            self._middleware = RequestMetricsMiddleware(
                self.app, self.publisher, exclude=self.settings.exclude_paths
            )
            self.publisher.start_tasks()
            if not lifespan:
                atexit.register(self._close_at_exit)
        return self._middleware

    async def _stop(self) -> None:
        if self.publisher is not None and not self._closed:
            self._closed = True
            await self.publisher.close()

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[NESTED] = True
        answered = False  # the app answered startup: it speaks the lifespan protocol

        async def app_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._start(lifespan=True)
            return message

        async def app_send(message: Message) -> None:
            nonlocal answered
            if message["type"].startswith("lifespan.startup."):
                answered = True
            if message["type"] in _ENDS:
                await self._stop()  # after the app's own shutdown, before the server's
            await send(message)

        try:
            try:
                await self.app(scope, app_receive, app_send)
            except Exception:
                if answered:
                    raise
                log.debug("the app does not speak the lifespan protocol", exc_info=True)
            if not answered:
                await self._answer_lifespan(receive, send)
        finally:
            await self._stop()

    async def _answer_lifespan(self, receive: Receive, send: Send) -> None:
        """The lifespan of an app that does not speak it: start, then stop at shutdown."""
        if self._middleware is None:
            await receive()  # lifespan.startup
            self._start(lifespan=True)
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self._stop()
        await send({"type": "lifespan.shutdown.complete"})

    def _close_at_exit(self) -> None:
        if self.publisher is not None and not self._closed:
            self._closed = True
            self.publisher.close_after_loop()
