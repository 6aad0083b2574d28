"""``vdm-hub up`` run as a user runs it: the URLs it prints work, live rows from the demo
traffic reach the stream, and stopping it (Ctrl-C, or a part dying) leaves nothing behind
(how a run is found in /proc: tests/uprun.py)."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.uprun import Up, sse_updates

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc"),
]

PARTS = {
    "worker": "vdm_hub.services.proxy.main",
    "stream": "vdm_hub.services.stream.main",
    "dashboard": "vdm_hub.dashboard.main",
    "demo-upstream": "vdm_hub.services.demo.upstream",
    "load": "vdm_hub.services.demo.load",
}
MISSING = sorted(name for name, module in PARTS.items() if importlib.util.find_spec(module) is None)
needs_every_part = pytest.mark.skipif(
    bool(MISSING), reason=f"not built yet: vdm-hub {', '.join(MISSING)}"
)


@needs_every_part
@pytest.mark.timeout(150)
def test_up_serves_live_demo_rows_and_ctrl_c_stops_everything(
    up_factory: list[Up], tmp_path: Path, key_prefix: str
) -> None:
    up = Up(tmp_path, key_prefix, "--ports", "auto", "--workers", "2")
    up_factory.append(up)
    dashboard = up.url("dashboard")
    stream = up.url("stream")
    prometheus = up.url("prometheus")
    workers = [up.url("worker 1"), up.url("worker 2")]
    redis = up.url("redis")
    up.proc.wait_for_line(r"OPENAI_BASE_URL=http://\S+/v1", timeout=5)
    assert dashboard.endswith("/dashboard/metrics")
    assert stream.endswith("/metrics/active-requests/stream")
    assert prometheus.endswith("/metrics") and redis.startswith("redis://")

    # Live rows from the demo traffic, on both workers, within a bound.
    seen_workers: set[str] = set()
    deadline = time.monotonic() + 30
    for update in sse_updates(stream, deadline):
        rows = update["active_requests"]
        assert isinstance(rows, list)
        seen_workers |= {str(row["worker_id"]) for row in rows}
        if seen_workers >= {"worker-1", "worker-2"}:
            break
    assert seen_workers >= {"worker-1", "worker-2"}, f"rows only from {seen_workers}"

    for url in workers:
        assert httpx.get(f"{url}/_vdm/healthz", timeout=5).status_code == 200
    assert "vdm_requests_in_flight" in httpx.get(prometheus, timeout=5).text
    # The local demo turns the dashboard's cancel action on.
    capabilities = httpx.get(prometheus + "/capabilities", timeout=5).json()
    assert capabilities["cancel_enabled"] is True
    assert "cancel: on for this demo" in up.proc.output
    page = httpx.get(dashboard, timeout=10)
    assert page.status_code == 200

    # Every part is a separate process: redis (+ its server), upstream, 2 workers, stream,
    # dashboard, load.
    children = up.pids()
    commands = " | ".join(info.cmdline for info in children.values())
    for part in ("redis", "demo-upstream", "worker", "stream", "dashboard", "load"):
        assert f"vdm_hub.services.cli {part}" in commands, f"no {part} process among {commands}"
    assert len(children) >= 8, children

    # Ctrl-C in a terminal: SIGINT to the whole foreground process group.
    started = time.monotonic()
    os.killpg(up.proc.popen.pid, signal.SIGINT)
    code = up.wait_exit(timeout=15)
    elapsed = time.monotonic() - started
    assert code == 0, up.proc.output[-3000:]
    up.assert_nothing_left()
    assert "vdm-hub up: stopped" in up.proc.output
    # The contract says 5 s; the slack is for two cores shared with other test runs.
    assert elapsed < 8, f"stopping took {elapsed:.1f}s"


@needs_every_part
@pytest.mark.timeout(120)
def test_a_child_that_dies_takes_the_others_down_and_is_named(
    up_factory: list[Up], tmp_path: Path, key_prefix: str
) -> None:
    up = Up(tmp_path, key_prefix, "--ports", "auto", "--workers", "1", "--no-demo-traffic")
    up_factory.append(up)
    up.url("dashboard")
    # The embedded Redis's wrapper, killed hard: its valkey-server (own session) is orphaned
    # and must still be swept up.
    children = up.pids()
    redis_pid = next(
        p for p, info in children.items() if "vdm_hub.services.cli redis" in info.cmdline
    )
    assert any(re.search(r"(valkey|redis)-server", i.cmdline) for i in children.values())
    os.kill(redis_pid, signal.SIGKILL)

    code = up.wait_exit(timeout=20)
    assert code != 0
    out = up.proc.output
    assert re.search(r"redis was killed by SIGKILL.*unexpectedly", out), out[-3000:]
    assert "stopping everything" in out
    up.assert_nothing_left()


@pytest.mark.timeout(60)
def test_a_port_in_use_is_a_clear_error_naming_the_option(
    up_factory: list[Up], tmp_path: Path, key_prefix: str
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        up = Up(tmp_path, key_prefix, "--dashboard-port", str(port), "--no-demo-traffic")
        up_factory.append(up)
        code = up.wait_exit(timeout=30)
    out = up.proc.output
    assert code != 0
    assert f"port {port} on 127.0.0.1 is in use (wanted by the dashboard)" in out, out
    assert "--dashboard-port" in out and "--ports auto" in out
    assert "Traceback" not in out
    up.assert_nothing_left()


@needs_every_part
@pytest.mark.timeout(90)
def test_sigterm_to_the_parent_alone_stops_everything(
    up_factory: list[Up], tmp_path: Path, key_prefix: str
) -> None:
    up = Up(tmp_path, key_prefix, "--ports", "auto", "--workers", "1", "--no-demo-traffic")
    up_factory.append(up)
    up.url("dashboard")
    assert len(up.pids()) >= 6  # redis + its server, upstream, worker, stream, dashboard
    up.proc.popen.send_signal(signal.SIGTERM)
    assert up.wait_exit(timeout=15) == 0, up.proc.output[-3000:]
    up.assert_nothing_left()
