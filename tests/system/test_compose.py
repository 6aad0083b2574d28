"""docker-compose.yml, proved without a Docker engine (test_compose_engine.py runs it on one).

1. It validates: ``docker-compose config`` (Debian's package works without an engine), with
   the optional profiles too; and its structure keeps the promises the docs make (scalable
   workers, Redis without persistence, healthchecks behind every ``service_healthy``, one
   image per role); Grafana's provisioning files match their schema (tests/system/
   grafana_schemas/, written from Grafana's provisioning docs: Grafana publishes none, and no
   Grafana image runs in the tests).
2. It works: every vdm-hub service's ``command``, ``environment`` and ``healthcheck`` from the
   file, run as local processes on loopback with free ports (compose host names and ports
   mapped to them), forms a system a request goes through end to end. The worker service runs
   twice, as ``--scale worker=2`` would, without a VDM_WORKER_ID, like in the file. Where a
   Docker engine runs, the engine test covers this too; this one needs none.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.procs import ROOT, Proc, wait_for
from vdm_hub.shared.embedded_redis import free_port

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read docker-compose.yml")

pytestmark = pytest.mark.system

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKER_COMPOSE = shutil.which("docker-compose")
# The parts of the hub the compose file runs, by the module behind each vdm-hub command.
COMMAND_MODULES = {
    "worker": "vdm_hub.services.proxy.main",
    "stream": "vdm_hub.services.stream.main",
    "dashboard": "vdm_hub.dashboard.main",
    "demo-upstream": "vdm_hub.services.demo.upstream",
    "load": "vdm_hub.services.demo.load",
}
# The public metric names (README, "The stream service"); histograms export _bucket/_sum/_count.
CONTRACT_METRICS = {
    "vdm_requests_in_flight",
    "vdm_requests_total",
    "vdm_request_duration_seconds",
    "vdm_workers",
    "vdm_sse_clients",
    "vdm_hub_lag_seconds",
    "vdm_messages_malformed_total",
    "vdm_worker_events_dropped_total",
    "vdm_batches_missed_total",
    "vdm_time_to_first_byte_seconds",
    "vdm_time_to_first_token_seconds",
    "vdm_oldest_request_age_seconds",
    "vdm_requests_stuck",
    "vdm_requests_stalled",
    "vdm_requests_cancelled_total",
}
PROFILES = ["--profile", "monitoring", "--profile", "demo"]
# The Dockerfile target (image) of each command; the rest run from `core`.
ROLE_TARGETS = {"stream": "stream", "dashboard": "dashboard"}
GRAFANA_SCHEMAS = Path(__file__).parent / "grafana_schemas"
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


# -- reading the file ---------------------------------------------------------------------


def _compose_config(*profiles: str) -> dict[str, Any]:
    """The file as compose resolves it (anchors, merges, ``${VAR:-default}``).

    With docker-compose installed, its own ``config`` output; otherwise PyYAML plus the
    default-value interpolation the file uses.
    """
    if DOCKER_COMPOSE is not None:
        profile_args = [a for p in profiles for a in ("--profile", p)]
        result = subprocess.run(
            [DOCKER_COMPOSE, "-f", str(COMPOSE_FILE), *profile_args, "config"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            env={k: v for k, v in os.environ.items() if not k.startswith(("VDM_", "GRAFANA_"))},
        )
        assert result.returncode == 0, result.stderr
        loaded: dict[str, Any] = yaml.safe_load(result.stdout)
        return loaded
    text = _INTERPOLATION.sub(lambda m: m.group(2) or "", COMPOSE_FILE.read_text())
    raw: dict[str, Any] = yaml.safe_load(text)
    return raw


def _env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _ports(service: Mapping[str, Any]) -> list[tuple[int | None, int]]:
    """(published host port or None, container port) for the short and the long syntax."""
    found: list[tuple[int | None, int]] = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            published = entry.get("published")
            found.append((int(published) if published else None, int(entry["target"])))
        else:
            parts = str(entry).split(":")
            found.append((int(parts[-2]) if len(parts) > 1 else None, int(parts[-1])))
    return found


def _depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def _is_hub(service: Mapping[str, Any]) -> bool:
    return str(service.get("image", "")).startswith("vdm-hub") or "build" in service


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


# -- 1. it validates ----------------------------------------------------------------------


@pytest.mark.skipif(
    DOCKER_COMPOSE is None,
    reason="docker-compose is not installed (apt-get install docker-compose; .ci/run does)",
)
def test_docker_compose_config_accepts_the_file_with_every_profile() -> None:
    services = set(_compose_config()["services"])
    assert {"redis", "upstream", "worker", "stream", "dashboard"} <= services
    result = subprocess.run(
        [DOCKER_COMPOSE or "", "-f", str(COMPOSE_FILE), *PROFILES, "config", "--services"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert {"prometheus", "grafana", "load"} <= set(result.stdout.split())


def test_compose_file_keeps_its_promises() -> None:
    config = _compose_config("monitoring", "demo")
    services: dict[str, Any] = config["services"]

    redis = services["redis"]
    assert str(redis["image"]).startswith("redis:7")
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    command = redis["command"]
    assert _flag(command, "--save") == "" and _flag(command, "--appendonly") == "no"

    # Scalable workers: no fixed name, no fixed host port, no fixed worker id.
    worker = services["worker"]
    assert "container_name" not in worker
    assert all(published is None for published, _ in _ports(worker))
    assert "VDM_WORKER_ID" not in _env(worker)

    for name, service in services.items():
        if not _is_hub(service):
            continue
        command = [str(part) for part in service["command"]]
        assert command[0] in COMMAND_MODULES, f"{name}: not a vdm-hub command: {command[0]}"
        if command[0] != "load":
            assert _flag(command, "--host") == "0.0.0.0", f"{name} must listen on all addresses"
            assert "healthcheck" in service, f"{name} has no healthcheck"
        for dep, condition in _depends_on(service).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}'s missing check"
    # Optional parts stay out of a plain `docker compose up`.
    assert services["load"]["profiles"] == ["demo"]
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["monitoring"]
    # The page reaches the stream service at its published port on the host the page came
    # from (whatever the browser calls it), and the stream allows the dashboard's port.
    stream_published = {p for p, _ in _ports(services["stream"])}
    dashboard_published = {p for p, _ in _ports(services["dashboard"])}
    dashboard_command = [str(p) for p in services["dashboard"]["command"]]
    assert int(_flag(dashboard_command, "--stream-port")) in stream_published
    assert "VDM_STREAM_PUBLIC_URL" not in _env(services["dashboard"])
    origins = _env(services["stream"])["VDM_CORS_ORIGINS"].split(",")
    assert any(urlsplit(o).port in dashboard_published for o in origins)
    # One image per role (Dockerfile targets), each with only its role's dependencies.
    for name, service in services.items():
        if _is_hub(service):
            command = str(service["command"][0])
            assert service["build"]["target"] == ROLE_TARGETS.get(command, "core"), name


def test_monitoring_config_matches_the_services_and_the_metric_names() -> None:
    services = _compose_config("monitoring")["services"]
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = [
        t
        for job in prometheus["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    ]
    stream_port = int(_flag([str(p) for p in services["stream"]["command"]], "--port"))
    assert targets == [f"stream:{stream_port}"]
    # The alert rules Prometheus loads are the repository's, mounted where it looks.
    mounts = {
        (v.split(":")[1], v.split(":")[0]) if isinstance(v, str) else (v["target"], v["source"])
        for v in services["prometheus"]["volumes"]
    }
    for rule_file in prometheus["rule_files"]:
        assert any(t == rule_file and s.endswith("alerts.yml") for t, s in mounts), mounts

    datasource = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert urlsplit(datasource["url"]).hostname == "prometheus"
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/vdm-hub.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for expr in exprs
        for name in re.findall(r"\bvdm_\w+", expr)
    }
    assert used <= CONTRACT_METRICS, used - CONTRACT_METRICS
    assert {"vdm_requests_in_flight", "vdm_request_duration_seconds", "vdm_sse_clients"} <= used
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {datasource["uid"]}


# -- 2. it works ----------------------------------------------------------------------------


class LocalCompose:
    """Runs compose services as local processes; compose addresses map to loopback ports."""

    def __init__(self, services: Mapping[str, Any], redis_url: str, key_prefix: str) -> None:
        self.services = services
        self.key_prefix = key_prefix
        redis = urlsplit(redis_url)
        # "service:container_port" and "localhost:published_port" -> "127.0.0.1:local_port"
        self.addresses: dict[str, str] = {"redis:6379": f"{redis.hostname}:{redis.port}"}
        self.procs: list[Proc] = []

    def translate(self, text: str, own: Mapping[str, str] | None = None) -> str:
        for address, local in {**self.addresses, **(own or {})}.items():
            text = text.replace(address, local)
        return text

    def assign_port(self, name: str, replica: int) -> tuple[int, dict[str, str]]:
        """A free local port for one replica; records how its compose addresses map."""
        command = [str(part) for part in self.services[name]["command"]]
        port = free_port()
        container = int(_flag(command, "--port"))
        local = f"127.0.0.1:{port}"
        if replica == 1:
            self.addresses[f"{name}:{container}"] = local
            for published, target in _ports(self.services[name]):
                if published is not None and target == container:
                    self.addresses[f"localhost:{published}"] = local
                    self.addresses[f"127.0.0.1:{published}"] = local
        # Inside the container the healthcheck reaches its own service on 127.0.0.1.
        return port, {f"127.0.0.1:{container}": local}

    def start(self, name: str, port: int) -> Proc:
        command = [self.translate(str(part)) for part in self.services[name]["command"]]
        command[command.index("--host") + 1] = "127.0.0.1"
        command[command.index("--port") + 1] = str(port)
        env = {k: self.translate(v) for k, v in _env(self.services[name]).items()}
        env["VDM_KEY_PREFIX"] = self.key_prefix
        proc = Proc([sys.executable, "-m", "vdm_hub.services.cli", *command], env=env, name=name)
        self.procs.append(proc)
        return proc

    def wait_healthy(self, name: str, proc: Proc, own: Mapping[str, str]) -> None:
        """Run the service's own healthcheck command until it passes (compose's condition)."""
        test = [
            self.translate(str(part), own) for part in self.services[name]["healthcheck"]["test"]
        ]
        assert test[:2] == ["CMD", "python"], f"{name}: healthcheck is not `python -c ...`"
        argv = [sys.executable, *test[2:]]

        def healthy() -> bool:
            assert proc.popen.poll() is None, f"{name} exited:\n{proc.output[-3000:]}"
            return subprocess.run(argv, capture_output=True, timeout=10).returncode == 0

        wait_for(healthy, timeout=30, interval=0.2, message=f"{name}'s healthcheck to pass")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=5)


def _start_order(services: Mapping[str, Any], names: list[str]) -> Iterator[str]:
    done: set[str] = set()
    while len(done) < len(names):
        ready = [
            n for n in names if n not in done and set(_depends_on(services[n])) - {"redis"} <= done
        ]
        assert ready, f"dependency cycle among {set(names) - done}"
        for name in ready:
            done.add(name)
            yield name


@pytest.mark.timeout(120)
def test_compose_services_run_as_local_processes_form_a_working_hub(
    redis_url: str, key_prefix: str
) -> None:
    services = _compose_config()["services"]
    names = [n for n, s in services.items() if _is_hub(s) and not s.get("profiles")]
    commands = {str(services[n]["command"][0]) for n in names}
    missing = [c for c in commands if importlib.util.find_spec(COMMAND_MODULES[c]) is None]
    if missing:
        pytest.skip(f"not built yet: vdm-hub {', '.join(sorted(missing))}")
    assert set(names) == {"upstream", "worker", "stream", "dashboard"}

    hub = LocalCompose(services, redis_url, key_prefix)
    replicas = {name: 2 if name == "worker" else 1 for name in names}  # --scale worker=2
    try:
        # Ports first: the stream's CORS origin names the dashboard before it runs.
        plan = [
            (name, *hub.assign_port(name, i))
            for name in names
            for i in range(1, replicas[name] + 1)
        ]
        urls: dict[str, list[str]] = {}
        for name in _start_order(services, names):
            started = [(hub.start(name, port), own) for n, port, own in plan if n == name]
            for proc, own in started:
                urls.setdefault(name, []).append(proc.wait_ready(timeout=30))
                hub.wait_healthy(name, proc, own)

        stream_url = urls["stream"][0]
        snapshot_url = f"{stream_url}/metrics/active-requests"

        def workers_registered() -> set[str]:
            ids = {w["worker_id"] for w in httpx.get(snapshot_url, timeout=5).json()["workers"]}
            return ids if len(ids) == 2 else set()

        worker_ids = wait_for(workers_registered, timeout=20, interval=0.2, message="2 workers")
        assert len(worker_ids) == 2  # each replica under its own default id

        # A request held open by the demo upstream shows up on the stream while in flight.
        request_id = f"compose-{key_prefix}"
        result: dict[str, Any] = {}

        def send() -> None:
            try:
                result["response"] = httpx.post(
                    f"{urls['worker'][0]}/v1/chat/completions",
                    headers={"x-demo-delay-ms": "3000", "x-request-id": request_id},
                    json={"model": "demo-model", "messages": [{"role": "user", "content": "hi"}]},
                    timeout=30,
                )
            except httpx.HTTPError as exc:
                result["error"] = exc

        sender = threading.Thread(target=send)
        sender.start()
        try:

            def in_flight() -> dict[str, Any] | None:
                rows = httpx.get(snapshot_url, timeout=5).json()["active_requests"]
                # The model may follow the start in a progress event a flush window later.
                return next((r for r in rows if r["request_id"] == request_id and r["model"]), None)

            row = wait_for(in_flight, timeout=15, interval=0.1, message="the row on the stream")
        finally:
            sender.join(30)
        assert row["worker_id"] in worker_ids
        assert row["model"] == "demo-model"
        assert row["path"] == "/v1/chat/completions"
        assert "error" not in result, result.get("error")
        assert result["response"].status_code == 200
        # Gone once finished, and the dashboard is configured with the stream's real URL.
        wait_for(lambda: in_flight() is None, timeout=10, interval=0.1, message="the row to end")
        metrics = httpx.get(f"{stream_url}/metrics", timeout=5).text
        assert "vdm_requests_total" in metrics
    finally:
        hub.stop()
    for proc in hub.procs:
        assert proc.popen.returncode is not None


def test_dockerfile_runs_every_role_as_a_non_root_user() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert re.search(r'^ENTRYPOINT \["vdm-hub"\]', text, re.M)
    stages = dict(re.findall(r"^FROM \S+ AS (\S+)\n(.*?)(?=^FROM |\Z)", text, re.M | re.S))
    for target in {"core", *ROLE_TARGETS.values()}:
        users = re.findall(r"^USER (\S+)", stages[target], re.M)
        assert users and users[-1] not in ("root", "0"), target
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


def test_paths_the_compose_file_mounts_exist() -> None:
    services = _compose_config("monitoring")["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name].get("volumes") or []:
            source = str(volume).split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            path = Path(source) if Path(source).is_absolute() else ROOT / source
            assert path.exists(), f"{name} mounts missing {source}"


@pytest.mark.parametrize(
    ("path", "schema"),
    [
        ("deploy/grafana/provisioning/datasources/prometheus.yml", "datasources"),
        ("deploy/grafana/provisioning/dashboards/vdm-hub.yml", "dashboard-providers"),
        ("deploy/grafana/dashboards/vdm-hub.json", "dashboard"),
    ],
)
def test_grafana_files_match_their_schema(path: str, schema: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    document = yaml.safe_load((ROOT / path).read_text())  # JSON is YAML too
    rules = json.loads((GRAFANA_SCHEMAS / f"{schema}.schema.json").read_text())
    errors = sorted(jsonschema.Draft202012Validator(rules).iter_errors(document), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_grafana_finds_the_provisioned_dashboard_where_compose_mounts_it() -> None:
    grafana = _compose_config("monitoring")["services"]["grafana"]
    mounts = {
        (v.split(":")[1] if isinstance(v, str) else v["target"]): (
            v.split(":")[0] if isinstance(v, str) else v["source"]
        )
        for v in grafana["volumes"]
    }
    providers = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/vdm-hub.yml").read_text()
    )["providers"]
    for provider in providers:
        source = Path(mounts[provider["options"]["path"]])
        source = source if source.is_absolute() else ROOT / source
        assert list(source.glob("*.json")), provider
    home = _env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    directory, name = home.rsplit("/", 1)
    source = Path(mounts[directory])
    assert ((source if source.is_absolute() else ROOT / source) / name).is_file()
    assert "/etc/grafana/provisioning" in mounts
