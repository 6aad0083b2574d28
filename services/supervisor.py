"""Run a set of child processes as one system: start in order, watch, stop in reverse.

``vdm-hub up`` uses it to run every part of the hub as a separate process, the way a real
deployment does. What it guarantees:

- each child is a :class:`shared.children.Child`: a session of its own, so a Ctrl-C to the
  terminal's process group reaches only the supervisor, which then stops the children in a
  chosen order; "ready" when it logs ``<name> ready on <url>`` (every vdm-hub service does),
  a bounded wait that fails early, with the child's output, if the child exits first;
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
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from vdm_hub.shared.children import Child, ChildFailed, Stopped, describe_exit

_PR_SET_CHILD_SUBREAPER = 36


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
        # Children this process had before the supervisor existed are not orphans of ours:
        # in-process (the unit tests) the sweep SIGTERMed the test session's own Redis.
        self._not_ours = set(_own_children())
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
        full_env = {**env, "TMPDIR": self.tmpdir}
        on_line = self._echo_for(name) if echo else None
        child = Child(name, argv, full_env, cwd=self.cwd, on_line=on_line)
        self.children.append(child)
        if wait_ready:
            child.wait_ready(self.ready_timeout, self.stop_event)
        return child

    def _echo_for(self, name: str) -> Callable[[str], None] | None:
        """Writes a child's lines to ``echo``, prefixed with its name, except muted ones."""
        out, mute = self.echo, self.mute
        if out is None:
            return None

        def write(line: str) -> None:
            if mute is not None and mute.search(line):
                return
            with contextlib.suppress(OSError, ValueError):  # a closed console must not kill us
                out.write(f"{name} | {line}\n")
                out.flush()

        return write

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
        # Pipes last: an orphan swept up above may have held one open.
        self._sweep_orphans()
        for child in self.children:
            child.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _stop_stage(self, stage: Sequence[Child], deadline: float) -> None:
        for child in stage:
            child.terminate()  # all of the stage at once: they stop in parallel
        for child in stage:
            if child.wait(deadline - time.monotonic()) is None and self.echo is not None:
                self.echo.write(f"{child.name} did not stop in time; killing it\n")
            # The child's process group even after a clean exit: a helper it started in its
            # own group and did not stop would otherwise outlive it.
            child.kill()

    def _sweep_orphans(self) -> None:
        known = {c.pid for c in self.children} | self._not_ours
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
