"""docker-compose.yml on a real Docker engine, unchanged, the way operators run it.

``../shared/tools/docker-standins up`` (beside the repository, as CI lays it out) starts
dockerd and builds local stand-ins for the public base images from Debian packages, since no
container registry is reachable here; then Debian's ``docker-compose`` (v1.29) builds the
project's own Dockerfile and runs the project's own compose file under a unique project name,
with free host ports through the file's ``${VDM_*_PORT:-default}`` variables:

1. every service comes up healthy;
2. ``--scale worker=3`` puts three workers on the stream;
3. the ``demo`` profile puts rows on the stream and on the dashboard, seen in headless
   Chromium through the published ports;
4. the ``monitoring`` profile's Prometheus scrapes the stream service (an ``up`` target) and
   has the alert rules loaded (Grafana has no stand-in: test_compose.py checks its
   provisioning files against their schema);
5. ``docker-compose down`` leaves no container.

Costs: the first ``docker-standins up`` takes ~2 minutes (debootstrap) and the first image
build ~3 minutes (pip from PyPI); later runs reuse both (the images' dependency layers depend
on pyproject.toml only), and the whole module takes ~1-2 minutes. The tests run in file order
on one compose project (module fixture); ``down`` runs in the fixture's teardown whatever
happens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import yaml

from tests.procs import ROOT, wait_for
from vdm_hub.shared.embedded_redis import free_port

pytestmark = pytest.mark.system

STANDINS = ROOT.parent / "shared" / "tools" / "docker-standins"
COMPOSE_FILE = ROOT / "docker-compose.yml"
# A tag of the test's own, so a run never replaces images a developer built as vdm-hub:*; it
# is stable across runs, so the next run starts from these images' layers.
TEST_IMAGE = "vdm-hub-test"
SETUP_TIMEOUT = 1800  # first run: debootstrap + three images' dependencies from PyPI


@dataclass
class Compose:
    """One compose project of the test: its name, host ports and command runner."""

    project: str
    ports: dict[str, int]
    log: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        # The caller's hub settings must not leak into the containers through ${VAR}.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VDM_", "GRAFANA_"))}
        env["VDM_IMAGE"] = TEST_IMAGE
        env.update({f"VDM_{name.upper()}_PORT": str(port) for name, port in self.ports.items()})
        return env

    def run(
        self, *args: str, profiles: Sequence[str] = (), timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        argv = ["docker-compose", "-p", self.project, "-f", str(COMPOSE_FILE)]
        argv += [a for p in profiles for a in ("--profile", p)]
        started = time.monotonic()
        done = subprocess.run(
            [*argv, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        took = time.monotonic() - started
        self.log.append(f"$ {' '.join(args)} -> {done.returncode} in {took:.0f}s")
        print(self.log[-1])
        assert done.returncode == 0, f"docker-compose {' '.join(args)}:\n{done.stderr[-4000:]}"
        return done

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def containers(self) -> list[dict[str, Any]]:
        """Every container of the project (running or not), as ``docker inspect`` sees it."""
        ids = _docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}")
        if not ids.split():
            return []
        inspected: list[dict[str, Any]] = json.loads(_docker("inspect", *ids.split()))
        return inspected


def _docker(*args: str, timeout: float = 60) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"docker {' '.join(args)}: {done.stderr[-2000:]}"
    return done.stdout


def _engine_or_skip() -> None:
    """Start the engine and the stand-in images (fast when they are there already)."""
    if not STANDINS.exists():
        pytest.skip(f"no Docker stand-ins tool at {STANDINS} (CI puts ../shared beside the repo)")
    if shutil.which("docker") is None and os.geteuid() != 0:
        pytest.skip("no docker client, and not root to let docker-standins install one")
    if os.geteuid() != 0 and subprocess.run(["docker", "version"], capture_output=True).returncode:
        pytest.skip("no Docker engine answering, and not root to let docker-standins start one")
    done = subprocess.run(
        [str(STANDINS), "up"], capture_output=True, text=True, timeout=SETUP_TIMEOUT
    )
    assert done.returncode == 0, f"docker-standins up failed:\n{done.stderr[-4000:]}"


def _health(container: dict[str, Any]) -> str:
    state = container["State"]
    return str(state["Health"]["Status"]) if state.get("Health") else str(state["Status"])


def _service(container: dict[str, Any]) -> str:
    return str(container["Config"]["Labels"]["com.docker.compose.service"])


@pytest.fixture(scope="module")
def compose() -> Iterator[Compose]:
    _engine_or_skip()
    names = ("stream", "dashboard", "prometheus", "grafana")
    project = Compose(f"vdmtest{uuid.uuid4().hex[:10]}", {n: free_port() for n in names})
    try:
        project.run("build", profiles=["demo"], timeout=SETUP_TIMEOUT)
        yield project
    finally:
        project.run("down", "--remove-orphans", "-v", profiles=["demo", "monitoring"])


def _workers(compose: Compose) -> list[dict[str, Any]]:
    snapshot = httpx.get(f"{compose.url('stream')}/metrics/active-requests", timeout=5).json()
    return list(snapshot["workers"])


@pytest.mark.timeout(SETUP_TIMEOUT + 300)
def test_every_service_comes_up_healthy(compose: Compose) -> None:
    # `up` itself waits for the healthchecks behind each `condition: service_healthy`.
    compose.run("up", "-d", timeout=300)

    def all_healthy() -> dict[str, str] | None:
        states = {_service(c): _health(c) for c in compose.containers()}
        return states if set(states.values()) == {"healthy"} else None

    states = wait_for(all_healthy, timeout=120, interval=1, message="every service healthy")
    assert set(states) == {"redis", "upstream", "worker", "stream", "dashboard"}
    images = {_service(c): str(c["Config"]["Image"]) for c in compose.containers()}
    users = {_service(c): c["Config"]["User"] for c in compose.containers()}
    assert all(users[s] == "vdm" for s, image in images.items() if image.startswith(TEST_IMAGE))
    # Each role runs from its own image, with only its role's dependencies.
    assert images["stream"] == f"{TEST_IMAGE}:stream"
    assert images["dashboard"] == f"{TEST_IMAGE}:dashboard"
    assert images["worker"] == images["upstream"] == f"{TEST_IMAGE}:core"


@pytest.mark.timeout(300)
def test_three_scaled_workers_are_on_the_stream(compose: Compose) -> None:
    compose.run("up", "-d", "--scale", "worker=3", timeout=300)

    def three() -> list[dict[str, Any]] | None:
        workers = [w for w in _workers(compose) if w["status"] == "up"]
        return workers if len(workers) == 3 else None

    workers = wait_for(three, timeout=60, interval=0.5, message="three workers on the stream")
    assert len({w["worker_id"] for w in workers}) == 3  # each container under its own id


@pytest.mark.browser
@pytest.mark.timeout(300)
def test_demo_profile_puts_rows_on_the_stream_and_the_dashboard(compose: Compose) -> None:
    compose.run("up", "-d", "--scale", "worker=3", profiles=["demo"], timeout=300)

    def rows() -> list[dict[str, Any]]:
        url = f"{compose.url('stream')}/metrics/active-requests"
        return list(httpx.get(url, timeout=5).json()["active_requests"])

    wait_for(rows, timeout=60, interval=0.5, message="demo rows on the stream")
    _dashboard_shows_rows(compose.url("dashboard"))


def _dashboard_shows_rows(dashboard: str) -> None:
    """Headless Chromium on the published dashboard port: Live, and rows in the grid."""
    from playwright.sync_api import sync_playwright

    from tests.browser.conftest import CHROMIUM_ARGS, DashboardPage
    from tests.browser.conftest import _chromium_or_skip as chromium_or_skip

    executable = chromium_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1600, "height": 1200})
            page = DashboardPage(tab, dashboard).open()
            page.wait_live(timeout=30000)
            page.wait_rows(lambda ids: len(ids) > 0, timeout=30, message="rows in the grid")
        finally:
            browser.close()


@pytest.mark.timeout(300)
def test_monitoring_prometheus_scrapes_the_stream_and_loads_the_alert_rules(
    compose: Compose,
) -> None:
    # Prometheus only: the monitoring profile's Grafana has no stand-in image here.
    compose.run(
        "up", "-d", "--scale", "worker=3", "prometheus", profiles=["monitoring"], timeout=300
    )
    api = f"{compose.url('prometheus')}/api/v1"

    def stream_target_up() -> dict[str, Any] | None:
        try:
            targets = httpx.get(f"{api}/targets", timeout=5).json()["data"]["activeTargets"]
        except httpx.HTTPError:
            return None
        return next((t for t in targets if t["health"] == "up"), None)

    target = wait_for(stream_target_up, timeout=90, interval=1, message="an `up` target")
    assert target["labels"]["job"] == "vdm-hub"
    assert target["scrapeUrl"] == "http://stream:8090/metrics"
    groups = httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"] if r["type"] == "alerting"}
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    assert loaded == {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {g["file"] for g in groups} == {"/etc/prometheus/alerts.yml"}


@pytest.mark.timeout(180)
def test_down_leaves_no_container(compose: Compose) -> None:
    compose.run("down", "--remove-orphans", "-v", profiles=["demo", "monitoring"], timeout=150)
    assert compose.containers() == []
    label = f"label=com.docker.compose.project={compose.project}"
    assert _docker("network", "ls", "-q", "--filter", label).split() == []
