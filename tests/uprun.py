"""One ``vdm-hub up`` run by a test as a user runs it, and how to tell what it left behind.

The processes of a run are found in /proc two ways (see ``family``): as descendants of the
``up`` process, and by a marker variable every process it starts inherits. So grandchildren
count too, such as the embedded Redis's valkey-server, which runs in a session of its own.
Used by tests/system/test_up.py and the remote-viewing browser test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

from tests.procs import Proc, vdm_hub, wait_for

UP_TIMEOUT = 60.0  # four Python services start on two shared cores


class ProcInfo(NamedTuple):
    ppid: int
    start: str  # start time in clock ticks: tells a pid's reuse from the same process
    cmdline: str
    marked: bool


def process_table(marker: str) -> dict[int, ProcInfo]:
    """Live (non-zombie) processes; ``marked`` when the environment carries ``marker``."""
    needle = f"VDM_TEST_MARKER={marker}".encode()
    table: dict[int, ProcInfo] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[-1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if fields[0] == "Z":
            continue
        table[int(entry)] = ProcInfo(
            ppid=int(fields[1]),
            start=fields[19],
            cmdline=cmdline.replace(b"\0", b" ").decode(errors="replace").strip(),
            marked=needle in environ.split(b"\0"),
        )
    return table


def family(root: int, marker: str) -> dict[int, ProcInfo]:
    """``root``'s descendants plus every process carrying the marker.

    Both, because each sees what the other misses: a process that rewrites its environment
    block (redis-server/valkey-server do, for their process title) is found as a descendant;
    one orphaned to init after ``root`` has gone is found by its marker.
    """
    table = process_table(marker)
    found = {pid: info for pid, info in table.items() if info.marked}
    frontier = [root, *found]
    visited: set[int] = set()
    while frontier:
        parent = frontier.pop()
        if parent in visited:
            continue
        visited.add(parent)
        for pid, info in table.items():
            if info.ppid == parent:
                found[pid] = info
                frontier.append(pid)
    found.pop(root, None)
    return found


def survivors(seen: dict[int, ProcInfo], marker: str) -> dict[int, str]:
    """Processes from ``seen`` (same pid and start time) or with the marker, still alive."""
    table = process_table(marker)
    return {
        pid: info.cmdline
        for pid, info in table.items()
        if info.marked or (pid in seen and seen[pid].start == info.start)
    }


class Up:
    """One ``vdm-hub up`` with its own marker and TMPDIR."""

    def __init__(self, tmp_path: Path, key_prefix: str, *args: str) -> None:
        self.marker = uuid.uuid4().hex
        self.tmpdir = tmp_path / "tmp"
        self.tmpdir.mkdir()
        env = {
            "VDM_TEST_MARKER": self.marker,
            "VDM_KEY_PREFIX": key_prefix,
            "TMPDIR": str(self.tmpdir),
        }
        if os.environ.get("REDIS_URL"):
            pytest.skip("REDIS_URL is set: these tests run `up` with its embedded Redis")
        self.proc: Proc = vdm_hub("up", *args, env=env)
        self.seen: dict[int, ProcInfo] = {}

    def url(self, label: str, timeout: float = UP_TIMEOUT) -> str:
        return self.proc.wait_for_line(rf"^\s*{label}: (\S+)", timeout).group(1)

    def pids(self) -> dict[int, ProcInfo]:
        """Every process this run started, directly or not; remembered for the final check."""
        found = family(self.proc.popen.pid, self.marker)
        self.seen.update(found)
        return found

    def wait_exit(self, timeout: float) -> int:
        try:
            wait_for(lambda: self.proc.popen.poll() is not None, timeout, interval=0.05)
        except TimeoutError:
            pytest.fail(f"vdm-hub up did not exit in {timeout}s:\n{self.proc.output[-3000:]}")
        self.proc.stop()  # joins the output reader
        return int(self.proc.popen.returncode)

    def assert_nothing_left(self) -> None:
        left = survivors(self.seen, self.marker)
        assert not left, f"processes left behind: {left}"
        assert list(self.tmpdir.iterdir()) == [], "temp files left behind"

    def cleanup(self) -> None:
        """Whatever happened in the test: no process of this run survives it."""
        self.proc.stop(timeout=10)
        for pid in survivors(self.seen, self.marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def sse_updates(url: str, deadline: float) -> Iterator[dict[str, object]]:
    """The ``data`` of each ``update`` event, until ``deadline`` (monotonic)."""
    with (
        httpx.Client(timeout=httpx.Timeout(10.0)) as client,
        client.stream("GET", url) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event = "message"
        data: list[str] = []
        for line in response.iter_lines():
            if time.monotonic() > deadline:
                return
            if line == "":
                if event == "update" and data:
                    yield json.loads("\n".join(data))
                event, data = "message", []
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
