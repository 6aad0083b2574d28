"""Run an ASGI app under Uvicorn the way every vdm-hub service does.

- binds the socket itself, so ``--port 0`` works and the logged URL is the real one;
- logs one ``<name> ready on <url>`` line once it accepts connections (tests and
  ``vdm-hub up`` wait for it);
- on SIGINT/SIGTERM calls ``on_exit`` first (so long-lived streams can end themselves), then
  shuts down with a bounded grace period, and returns normally: no re-raised signal, no
  traceback. Uvicorn's own handler re-raises the captured signal after shutdown and can wait
  forever for open SSE responses (sse-starlette issues 124, 128); both are avoided here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import signal
import socket
from collections.abc import Callable, Generator
from types import FrameType
from typing import Any

import uvicorn

from vdm_hub.shared.fdlimit import raise_open_file_limit

log = logging.getLogger("vdm.serve")

# The one line every service logs once it accepts connections, and the pattern everything that
# starts a service (``vdm-hub up``, tests, benchmarks) waits for: group 1 the name, 2 the URL.
READY_FORMAT = "%s ready on %s"
READY_LINE = re.compile(r"(\S+) ready on (\S+)")


class PortInUse(OSError):
    """The requested host:port cannot be bound."""


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_for(sock: socket.socket, scheme: str = "http") -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


class _Server(uvicorn.Server):
    def __init__(
        self, config: uvicorn.Config, name: str, url: str, on_exit: Callable[[], None] | None
    ) -> None:
        super().__init__(config)
        self._name = name
        self._url = url
        self._on_exit = on_exit

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            log.info(READY_FORMAT, self._name, self._url)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._on_exit is not None and not self.should_exit:
            self._on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Unlike Uvicorn's, this does not re-raise the signal after a graceful shutdown.
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def make_server(
    app: Any,
    sock: socket.socket,
    name: str,
    *,
    on_exit: Callable[[], None] | None = None,
    graceful_timeout: float = 1.0,
    **config: Any,
) -> uvicorn.Server:
    cfg = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=graceful_timeout,  # type: ignore[arg-type]  # float works
        lifespan="on",
        **config,
    )
    return _Server(cfg, name, url_for(sock), on_exit)


def beyond_loopback(host: str) -> bool:
    """Does listening on ``host`` let other machines connect (a wildcard, a real address)?"""
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() != "localhost"


def warn_if_open(name: str, host: str, url: str, exposed: str | None) -> None:
    """The one start-up line of a service open to the network without a token: ``exposed``
    says what anyone who can reach it can do (None: nothing to say, e.g. a token is set)."""
    if exposed and beyond_loopback(host):
        log.warning(
            "%s is open to the network on %s without VDM_AUTH_TOKEN: %s", name, url, exposed
        )


def serve(
    app: Any,
    host: str,
    port: int,
    name: str,
    *,
    on_exit: Callable[[], None] | None = None,
    graceful_timeout: float = 1.0,
    exposed: str | None = None,
    **config: Any,
) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code. ``exposed``: what anyone
    may do when the service listens beyond loopback without a token (logged once)."""
    raise_open_file_limit()  # every connection is a file descriptor (shared/fdlimit.py)
    sock = bind_socket(host, port)
    warn_if_open(name, host, url_for(sock), exposed)
    server = make_server(
        app, sock, name, on_exit=on_exit, graceful_timeout=graceful_timeout, **config
    )
    try:
        # uvloop when installed, as `uvicorn.run` would pick.
        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
            runner.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
    return 0 if server.started else 1


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO and httpcore logs response headers at DEBUG: a busy
    # worker would flood its log, and headers have no business in logs (docs/security.md).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
