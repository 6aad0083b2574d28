"""Real ``vdm-hub`` processes for system tests: start one, wait for its ready line, stop it.

A :class:`Proc` is a :class:`shared.children.Child` with the tests' defaults: the test's
environment plus what it passes, the repository as working directory, and all of its output
kept (``output``), so a failing test can show what the child said. Every wait is bounded.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from vdm_hub.shared.children import Child

T = TypeVar("T")

VDM_HUB = [sys.executable, "-m", "vdm_hub.services.cli"]
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


class Proc(Child):
    """One child process with all of its combined output kept, line by line."""

    def __init__(
        self, args: Sequence[str], env: Mapping[str, str] | None = None, name: str = ""
    ) -> None:
        super().__init__(
            name or " ".join(args[3:5]),
            args,
            {**os.environ, **(env or {})},
            cwd=ROOT,
            keep=None,
        )


def vdm_hub(command: str, *args: str, env: Mapping[str, str] | None = None) -> Proc:
    return Proc([*VDM_HUB, command, *args], env=env, name=f"vdm-hub {command}")
