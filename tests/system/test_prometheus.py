"""The alert rules and the Grafana dashboard against real tools: ``promtool check rules``, then a
real Prometheus scraping a real ``vdm-hub stream`` process evaluates every dashboard expression
and every alert rule without error (and the stuck-requests alert sees a stuck request).

Needs Debian's ``prometheus`` package (``.ci/run`` installs it): promtool and the server."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import yaml

from tests.procs import ROOT, Proc, vdm_hub
from tests.stream_support import FakeWorker, make_row
from vdm_hub.shared.embedded_redis import free_port
from vdm_hub.shared.keys import Keys

pytestmark = pytest.mark.system

ALERTS = ROOT / "deploy/prometheus/alerts.yml"
DASHBOARD = ROOT / "deploy/grafana/dashboards/vdm-hub.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_the_alerts_cover_what_operators_need() -> None:
    names = {rule["alert"] for rule in _alert_rules()}
    assert {"VdmWorkerDown", "VdmHubLagHigh", "VdmRequestsStuck", "VdmErrorRateHigh"} <= names
    assert "VdmStreamsStalled" in names
    for rule in _alert_rules():
        assert rule["annotations"]["summary"], rule["alert"]
    exprs = " ".join(_dashboard_exprs())
    assert "vdm_time_to_first_byte_seconds_bucket" in exprs and "vdm_requests_stuck" in exprs
    assert "vdm_time_to_first_token_seconds_bucket" in exprs
    assert "vdm_requests_stalled" in exprs


def test_errors_are_error_and_upstream_error_only() -> None:
    # A cancel or a client that hangs up is not a failure (README, "Outcomes"): every error
    # expression names the failing outcomes instead of "anything but ok".
    rules = {rule["alert"]: rule["expr"] for rule in _alert_rules()}
    assert 'outcome=~"error|upstream_error"' in rules["VdmErrorRateHigh"]
    for expr in _dashboard_exprs() + list(rules.values()):
        assert 'outcome!="ok"' not in expr, expr
    assert any('outcome=~"cancelled|client_closed"' in e for e in _dashboard_exprs())


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: prometheus)")
@pytest.mark.timeout(60)
def test_promtool_checks_the_alert_rules() -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in done.stdout


def _prometheus(tmp_path: Path, target: str) -> tuple[Proc, str]:
    assert PROMETHEUS is not None
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "vdm-hub",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [target]}],
            }
        ],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    proc = Proc(
        [
            PROMETHEUS,
            f"--config.file={path}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        name="prometheus",
    )
    return proc, f"http://127.0.0.1:{port}"


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian: prometheus)")
@pytest.mark.timeout(120)
async def test_a_real_prometheus_evaluates_every_dashboard_and_alert_expression(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    # Fleet state with something in every family: rows (one of them stuck), finished requests.
    worker = FakeWorker(redis, keys, "w1", ttl=600)
    worker.rows["stuck"] = make_row("w1", "stuck", model="m1", age=60.0)
    await worker.register()
    await worker.start("a", "b", model="m1")
    await worker.end("a")
    await worker.end("b", outcome="error")

    proc = vdm_hub(
        "stream",
        "--port",
        "0",
        env={"REDIS_URL": redis_url, "VDM_KEY_PREFIX": key_prefix, "VDM_STUCK_AFTER": "2"},
    )
    prom: Proc | None = None
    try:
        url = proc.wait_ready()
        prom, api = _prometheus(tmp_path, url.removeprefix("http://"))
        async with httpx.AsyncClient(base_url=api, timeout=5) as client:

            async def query(expr: str) -> list[Any] | None:
                try:
                    r = await client.get("/api/v1/query", params={"query": expr})
                except httpx.TransportError:
                    return None  # still starting
                if r.status_code == 503:
                    return None  # listening, not ready yet ("Service Unavailable", plain text)
                body = r.json()
                assert r.status_code == 200 and body["status"] == "success", (expr, body)
                result: list[Any] = body["data"]["result"]
                return result

            async def scraped() -> bool:
                return bool(await query('vdm_requests_stuck{worker="w1"} > 0'))

            await _wait(scraped, 60, "Prometheus to scrape the stream service")
            for expr in _dashboard_exprs() + [rule["expr"] for rule in _alert_rules()]:
                assert await query(expr) is not None, expr

            async def rules_evaluated() -> dict[str, dict[str, Any]] | None:
                body = (await client.get("/api/v1/rules")).json()
                rules = {r["name"]: r for g in body["data"]["groups"] for r in g["rules"]}
                for rule in rules.values():
                    assert rule["health"] != "err", rule
                stuck = rules.get("VdmRequestsStuck", {})
                evaluated = all(r["health"] == "ok" for r in rules.values())
                if len(rules) == len(_alert_rules()) and evaluated and stuck["alerts"]:
                    return rules
                return None

            # Evaluated after the first scrape: the stuck row makes its alert pending.
            rules = await _wait(rules_evaluated, 30, "every rule evaluated, the stuck one pending")
            stuck = rules["VdmRequestsStuck"]
            assert stuck["state"] in ("pending", "firing"), stuck
            assert stuck["alerts"][0]["labels"]["worker"] == "w1"
    finally:
        if prom is not None:
            prom.stop()
        proc.stop()


async def _wait(condition: Any, timeout: float, message: str) -> Any:
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.2)
