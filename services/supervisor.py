"""Run a set of child processes as one system: start in order, watch, stop in reverse.

``vdm-hub up`` uses it to run every part of the hub as a separate process, the way a real
deployment does. What it guarantees:

- each child gets its own session (``start_new_session``), so a Ctrl-C to the terminal's
  process group reaches only the supervisor, which then stops the children in a chosen order;
- a child is "ready" when it logs ``<name> ready on <url>`` (every vdm-hub service does); the
  wait is bounded and fails early, with the child's output, if the child exits first;
- a child that exits while the system runs is reported by name, exit code and output tail;
- stopping is SIGTERM, then SIGKILL after a bound, stage by stage under one overall deadline;
- nothing is left behind: the supervisor makes itself a child subreaper (Linux
  ``PR_SET_CHILD_SUBREAPER``), so a grandchild orphaned by a killed child (the embedded
  Redis runs ``valkey-server`` in a session of its own) is re-parented to us and swept up at
  the end; children get ``TMPDIR`` pointing into one directory that is removed at the end.

Synchronous and thread-based on purpose: it only waits on pipes and processes, and a plain
signal handler setting an :class:`threading.Event` is the simplest correct Ctrl-C handling.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from shared.serve import READY_LINE

TAIL_LINES = 40
_PR_SET_CHILD_SUBREAPER = 36


class ChildFailed(RuntimeError):
    """A child exited (or never became ready) while the system was meant to be running."""

    def __init__(self, child: Child, reason: str) -> None:
        self.child = child
        self.reason = reason
        super().__init__(f"{child.name} {reason}")

    def report(self) -> str:
        tail = self.child.tail()
        shown = "\n".join(f"  {line}" for line in tail) if tail else "  (no output)"
        return f"{self.child.name} {self.reason}; its last output:\n{shown}"


class Stopped(Exception):
    """Start-up was interrupted by a stop request (Ctrl-C / SIGTERM)."""


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
    """One child process; its combined output is forwarded (prefixed) and its tail kept."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        echo: TextIO | None = None,
        mute: re.Pattern[str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self._mute = mute
        self.argv = list(argv)
        self.url: str | None = None
        self._echo = echo
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._lines: list[str] = []  # kept only until ready; the ready wait scans them
        self._cond = threading.Condition()
        self._eof = False
        self.popen = subprocess.Popen(
            self.argv,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"out-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.rstrip("\n")
            with self._cond:
                self._tail.append(line)
                if self.url is None:
                    self._lines.append(line)
                self._cond.notify_all()
            if self._echo is not None and not (self._mute and self._mute.search(line)):
                with contextlib.suppress(OSError, ValueError):
                    self._echo.write(f"{self.name} | {line}\n")
                    self._echo.flush()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def tail(self) -> list[str]:
        with self._cond:
            return list(self._tail)

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait_ready(self, timeout: float, stop: threading.Event) -> str:
        """The URL from the ready line. Raises ChildFailed / Stopped."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            with self._cond:
                for line in self._lines[seen:]:
                    match = READY_LINE.search(line)
                    if match:
                        self.url = match.group(2)
                        self._lines.clear()
                        return self.url
                seen = len(self._lines)
                eof = self._eof
                if not eof and not stop.is_set():
                    self._cond.wait(max(0.0, min(deadline - time.monotonic(), 0.1)))
            if stop.is_set():
                raise Stopped
            if eof:
                try:
                    code = self.popen.wait(2)
                except subprocess.TimeoutExpired:
                    code = None
                raise ChildFailed(self, f"{describe_exit(code)} before it was ready")
            if time.monotonic() >= deadline:
                raise ChildFailed(self, f"was not ready within {timeout:g}s")

    def terminate(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        # The whole session's process group: a child's own helpers die with it. Still right
        # after the child was reaped: while any member of the group lives, Linux does not
        # reuse its id; once none does, killpg finds nothing (ESRCH).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()

    def close(self) -> None:
        self._reader.join(1.0)
        if self.popen.stdout is not None:
            with contextlib.suppress(OSError):
                self.popen.stdout.close()


def become_subreaper() -> bool:
    """Orphaned descendants get re-parented to this process instead of init (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _own_children() -> list[int]:
    """PIDs whose parent is this process (from /proc; empty where there is no /proc)."""
    me = os.getpid()
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid ...
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(me):
            found.append(int(entry))
    return found


class Supervisor:
    """Children started in order and stopped in reverse; see the module docstring."""

    def __init__(
        self,
        *,
        echo: TextIO | None = sys.stderr,
        mute: re.Pattern[str] | None = None,
        ready_timeout: float = 30.0,
        stop_timeout: float = 4.5,
        cwd: str | None = None,
    ) -> None:
        self.children: list[Child] = []
        self.stop_event = threading.Event()
        self.echo = echo
        self.mute = mute  # echoed lines matching it are only kept for failure reports
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.cwd = cwd
        self.tmpdir = tempfile.mkdtemp(prefix="vdm-up-")
        self.subreaper = become_subreaper()

    # -- start ---------------------------------------------------------------------------

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        wait_ready: bool = True,
        echo: bool = True,
    ) -> Child:
        """Start a child; with ``wait_ready`` return once it logged its ready line."""
        if self.stop_event.is_set():
            raise Stopped
        full_env = {**env, "TMPDIR": self.tmpdir, "PYTHONUNBUFFERED": "1"}
        child = Child(
            name, argv, full_env, echo=self.echo if echo else None, mute=self.mute, cwd=self.cwd
        )
        self.children.append(child)
        if wait_ready:
            child.wait_ready(self.ready_timeout, self.stop_event)
        return child

    # -- run -----------------------------------------------------------------------------

    def request_stop(self) -> None:
        self.stop_event.set()

    def watch(self, poll_interval: float = 0.1) -> None:
        """Block until a stop is requested (returns) or a child exits (raises ChildFailed)."""
        while not self.stop_event.wait(poll_interval):
            for child in self.children:
                code = child.poll()
                if code is not None:
                    raise ChildFailed(child, f"{describe_exit(code)} unexpectedly")

    # -- stop ----------------------------------------------------------------------------

    def stop(self, stages: Sequence[Sequence[Child]] | None = None) -> None:
        """Stop everything within ``stop_timeout``: stage by stage, SIGTERM then SIGKILL."""
        deadline = time.monotonic() + self.stop_timeout
        if stages is None:
            stages = [[child] for child in reversed(self.children)]
        listed = {id(c) for stage in stages for c in stage}
        # Anything started but not named in a stage goes first.
        extra = [c for c in self.children if id(c) not in listed]
        ordered: list[Sequence[Child]] = [extra, *stages] if extra else list(stages)
        for index, stage in enumerate(ordered):
            left = len(ordered) - index
            # Each stage may use its share of what is left, so one slow stage cannot starve
            # the rest (Redis goes last and must get its turn to exit cleanly).
            budget = max(0.2, (deadline - time.monotonic()) / left)
            self._stop_stage(stage, min(deadline, time.monotonic() + budget))
        self._sweep_orphans()
        for child in self.children:
            child.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _stop_stage(self, stage: Sequence[Child], deadline: float) -> None:
        for child in stage:
            child.terminate()
        for child in stage:
            try:
                child.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if self.echo is not None:
                    self.echo.write(f"{child.name} did not stop in time; killing it\n")
            # SIGKILL the child's process group even after a clean exit: a helper it
            # started in its own group and did not stop would otherwise outlive it.
            child.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(1.0)

    def _sweep_orphans(self) -> None:
        known = {c.pid for c in self.children}
        orphans = [pid for pid in _own_children() if pid not in known]
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 1.0
        for pid in orphans:
            while True:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if done:
                    break
                if time.monotonic() >= deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, 0)
                    break
                time.sleep(0.02)
