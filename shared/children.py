"""One child process: start it, wait for a line it logs (its ready line), stop it.

The one way vdm-hub runs a part of itself, or anything else, as a child process: ``vdm-hub
up`` (``services/supervisor.py``), the benchmarks (``bench/procs.py``) and the system tests
(``tests/procs.py``) all use :class:`Child`; what differs between them (restart and stop
order, CPU pinning, fixtures) stays with them. It lives in ``shared/`` next to
``shared/serve.py``, which prints the ready line this waits for. What it guarantees:

- the child gets a session of its own (``start_new_session``): a Ctrl-C to the terminal's
  process group reaches only the parent, and the child's process group can be killed whole;
- its combined stdout/stderr is read line by line on a thread, so a chatty child never blocks
  on a full pipe; the last ``keep`` lines are kept (all with ``keep=None``) for waits and
  failure reports, and each line goes to ``on_line`` (echo, collecting) as it arrives. With
  ``log=PATH`` the output goes to that file instead, untouched by this process;
- every wait is bounded and ends early when the child exits; a failure raises
  :class:`ChildFailed`, which names the exit code and shows the child's last output lines;
- :meth:`Child.stop` is SIGTERM (sent once: a second one makes Uvicorn skip its graceful
  shutdown), a bounded wait, SIGKILL to the whole process group, reap. The pipe is closed by
  its reader at end of file, so no process or file descriptor outlives the child.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from vdm_hub.shared.serve import READY_LINE

TAIL_LINES = 40
WAIT_TIMEOUT = 30.0  # a Python child on a loaded machine: imports alone can take seconds
REAP_TIMEOUT = 2.0  # after SIGKILL, or after the pipe closed: the exit is a moment away


class ChildFailed(RuntimeError):
    """A child exited, or did not log what was waited for in time."""

    def __init__(self, child: Child, reason: str) -> None:
        self.child = child
        self.reason = reason
        super().__init__(self.report())

    def report(self) -> str:
        tail = self.child.tail()
        shown = "\n".join(f"  {line}" for line in tail) if tail else "  (no output)"
        return f"{self.child.name} {self.reason}; its last output:\n{shown}"


class Stopped(Exception):
    """A wait was cut short by a stop request (the ``stop`` event was set)."""


def describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code})"
    return f"exited with code {code}"


class Child:
    """One child process; see the module docstring."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        cwd: str | Path | None = None,
        keep: int | None = TAIL_LINES,
        on_line: Callable[[str], None] | None = None,
        log: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self._url: str | None = None
        self.log = log
        self._lines: deque[str] = deque(maxlen=keep)
        self._count = 0  # lines read so far, kept or not
        self._on_line = on_line
        self._cond = threading.Condition()
        self._eof = False
        self._terminated = False
        self._killed = False
        # Python children write each line as it happens, or a wait would miss it.
        full_env = {**env, "PYTHONUNBUFFERED": "1"}
        out = log.open("w") if log is not None else None
        try:
            self.popen = subprocess.Popen(
                self.argv,
                env=full_env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out if out is not None else subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
            )
        finally:
            if out is not None:
                out.close()  # the child has its own copy
        self._reader: threading.Thread | None = None
        if log is None:
            self._reader = threading.Thread(target=self._read, name=f"out-{name}", daemon=True)
            self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def url(self) -> str | None:
        """The URL from the child's ready line, once it came."""
        return self._url

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float) -> int | None:
        """The exit code once the child has exited; None if it still runs after ``timeout``."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.popen.wait(max(0.0, timeout))
        return None

    # -- output --------------------------------------------------------------------------

    def _read(self) -> None:
        stdout = self.popen.stdout
        assert stdout is not None
        try:
            for raw in stdout:
                line = raw.rstrip("\n")
                with self._cond:
                    self._lines.append(line)
                    self._count += 1
                    if self._url is None:
                        match = READY_LINE.search(line)
                        if match:
                            self._url = match.group(2)
                    self._cond.notify_all()
                if self._on_line is not None:
                    self._on_line(line)
        finally:
            with contextlib.suppress(OSError):
                stdout.close()
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _kept(self, since: int = 0) -> tuple[int, list[str]]:
        """(number of the first line returned, the kept lines from line ``since`` on).

        With a log file, the whole file is read each time: such a child is waited on rarely.
        """
        if self.log is not None:
            try:
                lines = self.log.read_text(errors="replace").splitlines()
            except OSError:
                lines = []
            return since, lines[since:]
        with self._cond:
            first = self._count - len(self._lines)
            start = max(since, first)
            return start, list(itertools.islice(self._lines, start - first, None))

    def tail(self, lines: int = TAIL_LINES) -> list[str]:
        return self._kept()[1][-lines:]

    @property
    def output(self) -> str:
        """Every kept line (all of the output with ``keep=None``)."""
        return "\n".join(self._kept()[1])

    # -- waits ---------------------------------------------------------------------------

    def _exited(self) -> bool:
        if self.log is not None:
            return self.popen.poll() is not None
        return self._eof

    def _wait(
        self,
        found: Callable[[], str | re.Match[str] | None],
        timeout: float,
        stop: threading.Event | None,
        *,
        before: str,
        late: str,
    ) -> str | re.Match[str]:
        """``found()`` once it is not None; ``before`` and ``late`` word the failures."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                value = found()
                if value is not None:
                    return value
                exited = self._exited()
                stopping = stop is not None and stop.is_set()
                if not exited and not stopping:
                    self._cond.wait(max(0.0, min(deadline - time.monotonic(), 0.1)))
            if stopping:
                raise Stopped
            if exited:
                value = found()  # the last lines may hold it
                if value is not None:
                    return value
                code = self.wait(REAP_TIMEOUT)
                raise ChildFailed(self, f"{describe_exit(code)} {before}")
            if time.monotonic() >= deadline:
                raise ChildFailed(self, f"{late} within {timeout:g}s")

    def wait_ready(self, timeout: float = WAIT_TIMEOUT, stop: threading.Event | None = None) -> str:
        """The URL from the child's ``<name> ready on <url>`` line.

        Raises :class:`ChildFailed` (exited, or not ready in time) or :class:`Stopped`.
        """
        if self.log is not None:
            raise ValueError(f"{self.name}: a child logging to a file has no ready wait")
        url = self._wait(
            lambda: self._url, timeout, stop, before="before it was ready", late="was not ready"
        )
        assert isinstance(url, str)
        return url

    def wait_for_line(
        self,
        pattern: str | re.Pattern[str],
        timeout: float = WAIT_TIMEOUT,
        stop: threading.Event | None = None,
    ) -> re.Match[str]:
        """The first kept line matching ``pattern``, waiting for it if need be."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        seen = 0

        def found() -> re.Match[str] | None:
            nonlocal seen
            first, lines = self._kept(seen)
            for line in lines:
                match = regex.search(line)
                if match:
                    return match
            seen = first + len(lines)
            return None

        what = f"line matching {regex.pattern!r}"
        match = self._wait(
            found, timeout, stop, before=f"before it logged a {what}", late=f"logged no {what}"
        )
        assert isinstance(match, re.Match)
        return match

    # -- stop ----------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM, once."""
        if not self._terminated:
            self._terminated = True
            self.signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to the child's whole process group, then reap it."""
        # The group too: a helper the child started and did not stop dies with it. Only while
        # the child is not reaped (alive or a zombie): until then its pid, which is the
        # group's id, cannot be given to another process. Once it is reaped and its group is
        # empty, the id is free, and pids wrap (pid_max is 32768 here): a new process that
        # makes itself a session leader with that id (a Redis a test started, Chromium) would
        # get our SIGKILL. Seen: a session's Redis killed mid-suite under pytest-xdist.
        if not self._killed and self.popen.returncode is None:
            self._killed = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
        self.wait(REAP_TIMEOUT)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, SIGKILL, reap; the exit code.

        The exit code is the child's own when it stopped in time; None only when even SIGKILL
        did not end it within a bound (an uninterruptible wait in the kernel).
        """
        self.terminate()
        self._wait_unreaped(timeout)
        self.kill()
        self.close()
        return self.popen.returncode

    def _wait_unreaped(self, timeout: float) -> None:
        """Until the child has exited or ``timeout`` passed, leaving it unreaped (a zombie keeps
        its pid, and so its group's id, ours until :meth:`kill` has signalled the group)."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        while self.popen.returncode is None:
            try:
                info = os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return  # reaped meanwhile by someone else's wait
            if info is not None or time.monotonic() >= deadline:
                return
            time.sleep(delay)  # polling a child's exit: there is no fd to wait on
            delay = min(0.05, delay * 2)

    def close(self) -> None:
        """Wait (bounded) for the reader to reach the end of the output and close the pipe."""
        if self._reader is not None:
            self._reader.join(REAP_TIMEOUT)
