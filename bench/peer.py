"""vandamme-proxy 2.0.9, the single-process dashboard proxy this hub replaces, as a reference.

It is installed from PyPI into a virtualenv of its own (never into ours), kept between runs
under ``$VDM_BENCH_CACHE`` [``~/.cache/vdm-bench``] so only the first run pays for the install,
and run with its home in the scenario's temp dir (it writes its config and caches there).

How it is put in front of our demo upstream (read from its package: ``src/core/provider``,
``src/api/metrics.py``): a provider ``NAME`` is configured by ``NAME_API_KEY`` and
``NAME_BASE_URL``; ``NAME_CUSTOM_HEADER_X_Y=v`` adds ``X-Y: v`` to every upstream request of
that provider, which is how the demo upstream's hold (``x-demo-delay-ms``) reaches it (client
headers are not forwarded). Two providers point at the same upstream: ``openai`` (the default,
holding each request ``hold_ms``) for the probes and ``held`` (models ``held:NAME``) for the
background requests that stay in flight. Its stream is ``GET /metrics/active-requests/stream``:
``event: update`` frames with ``{"disabled", "active_requests": [row], "timestamp"}``, one
``json.dumps`` per client per change; a row's ``model`` is the client's model without a
``provider:`` prefix and its ``request_id`` a UUID of its own.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from vdm_hub.shared.children import Child, ChildFailed, describe_exit
from vdm_hub.shared.embedded_redis import free_port

VERSION = "2.0.9"
PACKAGE = f"vandamme-proxy=={VERSION}"


def cache_dir() -> Path:
    return Path(os.environ.get("VDM_BENCH_CACHE", Path.home() / ".cache" / "vdm-bench"))


def venv_dir() -> Path:
    return cache_dir() / f"vandamme-{VERSION}"


def installed() -> bool:
    """Already in the cache (a test uses it only then; installing needs the network)."""
    return (venv_dir() / ".installed").exists() and (venv_dir() / "bin" / "vdm").exists()


def ensure_installed(timeout: float = 600) -> Path:
    """The ``vdm`` executable of vandamme-proxy, installing it first when needed.

    Raises ``RuntimeError`` with pip's last lines when it cannot be installed (no network,
    no index): the caller reports that instead of a comparison.
    """
    venv = venv_dir()
    exe = venv / "bin" / "vdm"
    stamp = venv / ".installed"
    if exe.exists() and stamp.exists():
        return exe
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         PACKAGE],
    ]  # fmt: skip
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
            raise RuntimeError(f"cannot install {PACKAGE}: {' '.join(step[:4])} failed:\n{tail}")
    stamp.touch()
    return exe


class Vandamme:
    """One vandamme-proxy process in front of ``upstream`` (our ``demo-upstream``)."""

    def __init__(self, upstream: str, home: Path, *, hold_ms: int, held_ms: int = 600_000):
        exe = ensure_installed()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        home.mkdir(parents=True, exist_ok=True)
        base = upstream.rstrip("/") + "/v1"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "LOG_REQUEST_METRICS": "true",
            # Its packaged profiles name providers we do not configure; that is not an error
            # for what is measured here.
            "VDM_STRICT_PROFILE_VALIDATION": "false",
            "VDM_DEFAULT_PROVIDER": "openai",
            "OPENAI_API_KEY": "sk-bench-not-secret",
            "OPENAI_BASE_URL": base,
            "OPENAI_CUSTOM_HEADER_X_DEMO_DELAY_MS": str(hold_ms),
            "HELD_API_KEY": "sk-bench-not-secret",
            "HELD_BASE_URL": base,
            "HELD_CUSTOM_HEADER_X_DEMO_DELAY_MS": str(held_ms),
            "REQUEST_TIMEOUT": str(held_ms // 1000 + 60),
            "NO_COLOR": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.child = Child(
            f"vandamme-proxy {VERSION}",
            [str(exe), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env,
            cwd=home,
            log=home / "vandamme.log",
        )

    @property
    def pid(self) -> int:
        return self.child.pid

    def wait_ready(self, timeout: float = 60) -> str:
        """Once ``/health`` answers 200 (it logs no vdm-hub ready line)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.child.poll()
            if code is not None:
                raise ChildFailed(
                    self.child, f"{VERSION} {describe_exit(code)} before it was ready"
                )
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(self.url + "/health", timeout=2) as answer,
            ):
                if answer.status == 200:
                    return self.url
            time.sleep(0.2)
        raise ChildFailed(self.child, f"was not ready within {timeout:g}s")

    def stop(self) -> None:
        self.child.stop()
