"""An earlier commit's code, to run its worker side by side with today's.

``python -m bench --baseline REF`` (or ``VDM_BENCH_BASELINE=REF``) makes the overhead scenario
start that commit's worker, instrumented and bare, next to today's, in front of the same
upstream and in the same interleaved rounds, and the vandamme scenario instrument a third
vandamme-proxy with that commit's ``vdm_hub``: "did the worker (or the instrumentation) get
slower than it was" answered in one run, instead of by comparing figures taken on different
days (this machine's speed drifts by more than the differences in question). The tree comes
from ``git archive``, so the checkout needs its history; it runs with this virtualenv (its
dependencies must still import).
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

from bench.procs import ROOT

REF_ENV = "VDM_BENCH_BASELINE"


def ref() -> str | None:
    """The baseline commit asked for, if any."""
    return os.environ.get(REF_ENV) or None


def describe(commit: str) -> str:
    """``<short hash> (<date>)`` of ``commit``, for table titles."""
    out = subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%h (%cs)", commit],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def checkout(commit: str, into: Path) -> Path:
    """The tree of ``commit`` written below ``into``; returns its root."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", commit],
        check=True,
        capture_output=True,
    ).stdout
    root = into / "tree"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    return root
