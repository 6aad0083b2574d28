"""Command-line option types: a bad value is one line naming the option, and exit code 2.

argparse reports a type function's :class:`argparse.ArgumentTypeError` as ``argument
--port: <message>``; :class:`OneLineParser` prints that on one line (no usage block), the way
a bad environment variable is reported (``shared/settings.py``). Values that only fail later
would end in a traceback (``--port 70000`` in ``bind``: ``OverflowError``), so each type checks
what the service will do with the value: a port is a number in 0-65535, a host is an address
this machine can listen on, a URL has a scheme and a host.
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any, NoReturn

from vdm_hub.shared.settings import ConfigError, http_url

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr, then exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _bounded(kind: Callable[[str], float], noun: str, low: float, high: float | None) -> Any:
    bounds = f"{low:g}..{high:g}" if high is not None else f">= {low:g}"

    def parse(raw: str) -> float:
        try:
            value = kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not {noun}") from None
        if not (low <= value and (high is None or value <= high)):  # NaN fails too
            raise argparse.ArgumentTypeError(f"{raw} is outside {bounds}")
        return value

    return parse


def number(low: float, high: float | None = None) -> Callable[[str], float]:
    """A number in ``low..high`` (no upper bound when ``high`` is None)."""
    parse: Callable[[str], float] = _bounded(float, "a number", low, high)
    return parse


def whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number in ``low..high`` (no upper bound when ``high`` is None)."""
    parse: Callable[[str], int] = _bounded(int, "a whole number", low, high)
    return parse


def port(raw: str) -> int:
    """A TCP port, 0 meaning "any free one"."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a port number (0-65535)") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{raw} is not a port number (0-65535)")
    return value


def listen_host(raw: str) -> str:
    """An address this machine can listen on: checked by binding it (port 0, closed at once).

    A name that does not resolve, or an address of another machine, fails here with one line
    instead of as an ``OSError`` from the server's ``bind`` after start-up.
    """
    host = raw.strip().strip("[]")
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise argparse.ArgumentTypeError(f"{raw!r}: unknown host ({reason})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address[0], 0))
        except OSError as exc:
            hint = " (not an address of this machine)" if exc.errno == errno.EADDRNOTAVAIL else ""
            raise argparse.ArgumentTypeError(
                f"cannot listen on {raw}: {exc.strerror}{hint}"
            ) from None
    return host


def log_level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in LOG_LEVELS or not isinstance(logging.getLevelName(value), int):
        raise argparse.ArgumentTypeError(
            f"{raw!r} is not a log level (choose from {', '.join(LOG_LEVELS)})"
        )
    return value


def http_base_url(raw: str) -> str:
    """An ``http://`` or ``https://`` URL with a host (``localhost:8080`` is refused)."""
    try:
        return http_url("URL", raw)
    except ConfigError:
        example = f" (e.g. http://{raw.strip()})" if "://" not in raw and raw.strip() else ""
        raise argparse.ArgumentTypeError(
            f"{raw!r} is not an http:// or https:// URL with a host{example}"
        ) from None
