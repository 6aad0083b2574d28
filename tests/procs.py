"""Real ``vdm-hub`` processes for system tests: start one, wait for its ready line, stop it.

Every wait is bounded. Output is collected on a thread so a chatty child never blocks on a full
pipe, and so a failing test can show what the child said.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from shared.serve import READY_LINE

T = TypeVar("T")

VDM_HUB = [sys.executable, "-m", "services.cli"]
ROOT = Path(__file__).resolve().parents[1]


def wait_for(
    condition: Callable[[], T | bool | None],
    timeout: float,
    interval: float = 0.02,
    message: str = "condition",
) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class Proc:
    """One child process with its combined output captured line by line."""

    def __init__(
        self, args: Sequence[str], env: Mapping[str, str] | None = None, name: str = ""
    ) -> None:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.args = list(args)
        self.name = name or " ".join(args[3:5])
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(
            self.args,
            env=full_env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        self.popen.stdout.close()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str | re.Pattern[str], timeout: float = 20.0) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (
                    self.popen.poll() is not None and not self._reader.is_alive()
                ):
                    raise TimeoutError(
                        f"{self.name}: no line matching {regex.pattern!r} within {timeout}s "
                        f"(exit code {self.popen.poll()}); output:\n{self.output[-4000:]}"
                    )
                self._cond.wait(min(remaining, 0.2))

    def wait_ready(self, timeout: float = 20.0) -> str:
        """The URL from the child's ``<name> ready on <url>`` line."""
        return self.wait_for_line(READY_LINE, timeout).group(2)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._reader.join(5)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


def vdm_hub(command: str, *args: str, env: Mapping[str, str] | None = None) -> Proc:
    return Proc([*VDM_HUB, command, *args], env=env, name=f"vdm-hub {command}")
