"""``python -m bench`` as a user runs it: it writes nothing tracked unless asked, and says how
to run it when started by a Python without the project's dependencies."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import pytest

from bench import run
from tests.procs import ROOT

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Runs no scenario; records the command of every write to docs/performance.md."""
    commands: list[str] = []

    async def no_scenarios(names: Sequence[str], quick: bool) -> list[Any]:
        return []

    def write_doc(results: Sequence[Any], command: str, conditions: str) -> None:
        commands.append(command)

    monkeypatch.setattr(run, "run_all", no_scenarios)
    monkeypatch.setattr(run, "write_doc", write_doc)
    return commands


def test_a_run_writes_nothing_unless_asked(written: list[str]) -> None:
    assert run.main(["--scenario", "rows"]) == 0
    assert written == []


def test_write_records_the_command_that_reproduces_the_figures(written: list[str]) -> None:
    assert run.main(["--scenario", "rows", "--write"]) == 0
    assert written == ["python -m bench --scenario rows"]


def test_quick_runs_are_never_written(written: list[str]) -> None:
    assert run.main(["--quick", "--write"]) == 0
    assert written == []


def test_outside_the_virtualenv_it_says_how_to_run_it() -> None:
    # -S: no site-packages, as with a system python3 that lacks the project's dependencies.
    done = subprocess.run(
        [sys.executable, "-S", "-m", "bench", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "run it as .venv/bin/python -m bench, after scripts/bootstrap" in lines[0]
