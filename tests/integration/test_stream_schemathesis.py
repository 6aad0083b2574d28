"""Schemathesis against the stream service's OpenAPI schema: no 5xx on any documented endpoint.

A real ``vdm-hub stream`` process on a real Redis (so ``/readyz`` is really ready and every
endpoint reads real state), with a worker's state in Redis so the snapshot and summary have
rows to encode. The SSE endpoint is a plain Starlette route, not in the schema; it gets its own
bounded hostile-header test below.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis

from tests.procs import Proc, vdm_hub, wait_for
from vdm_hub.shared import schema as wire
from vdm_hub.shared.embedded_redis import EmbeddedRedis
from vdm_hub.shared.keys import Keys

pytestmark = pytest.mark.integration


def _seed_worker(redis_url: str, keys: Keys) -> None:
    """A registered worker with one row, written the way the register script leaves it."""
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_url)
    try:
        row = wire.Row(
            request_id="r1",
            worker_id="w1",
            method="POST",
            path="/v1/chat/completions",
            model="gpt-4o-mini",
            provider="openai",
            is_streaming=True,
            start_time=time.time(),
            phase="streaming",
            bytes_out=10,
            input_tokens=None,
            output_tokens=None,
        )
        record = wire.WorkerRecord(
            worker_id="w1",
            host="h",
            pid=1,
            started_at=time.time(),
            upstream="http://u",
            version="0",
            epoch="e1",
            heartbeat_interval=2.0,
            ttl=600.0,
        )
        client.hset(keys.workers, "w1", wire.encode(record))
        client.zadd(keys.alive, {"w1": (time.time() + 600) * 1000})
        client.hset(keys.seq, "w1", "e1:1")
        client.hset(keys.active("w1"), "r1", wire.encode_row(row))
    finally:
        client.close()


@pytest.fixture(scope="module")
def stream_url(redis_server: EmbeddedRedis) -> Iterator[str]:
    prefix = f"schemathesis{time.monotonic_ns()}"
    _seed_worker(redis_server.url, Keys(prefix))
    proc: Proc = vdm_hub(
        "stream",
        "--port",
        "0",
        env={
            "REDIS_URL": redis_server.url,
            "VDM_KEY_PREFIX": prefix,
            "VDM_ACTIVE_REQUESTS_SSE_INTERVAL": "0.2",
        },
    )
    try:
        url = proc.wait_ready()
        wait_for(
            lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200,
            timeout=15,
            message="stream /readyz",
        )
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def api_schema(stream_url: str) -> Any:
    return schemathesis.openapi.from_url(f"{stream_url}/openapi.json")


def _operations(api_schema: Any) -> list[Any]:
    return [result.ok() for result in api_schema.get_all_operations()]


def test_the_schema_documents_the_json_endpoints(api_schema: Any) -> None:
    paths = {op.path for op in _operations(api_schema)}
    assert {"/metrics/active-requests", "/metrics", "/healthz", "/readyz"} <= paths
    assert {"/metrics/capabilities", "/metrics/active-requests/{request_id}/cancel"} <= paths
    assert "/metrics/completed" in paths


@pytest.mark.timeout(120)
def test_no_documented_endpoint_answers_5xx(stream_url: str, tmp_path: Path) -> None:
    # The schemathesis CLI, not its pytest plugin: `schemathesis.pytest.from_fixture` breaks on
    # pytest 9 (it reads Function._nodeid), and the CLI's coverage phase (unexpected methods,
    # odd headers and query strings, boundary values) finds more than a plain strategy does
    # for endpoints without parameters. Only "no 5xx" is checked: the endpoints answer plain
    # Responses the generated schema cannot describe, so conformance is not the question.
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{stream_url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "25",
        "--seed",
        "1",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=100,
        cwd=tmp_path,  # it keeps a .schemathesis/ cache in its working directory
        env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": ""},
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    # It really ran: every documented operation was tested, with many generated cases.
    # (8: the five data and probe endpoints, the completed search, the capabilities and the
    # cancel action.)
    tested = re.search(r"Tested: (\d+)", output)
    assert tested is not None and int(tested.group(1)) >= 8, output[-3000:]
    generated = re.search(r"(\d+) generated", output)
    assert generated is not None and int(generated.group(1)) >= 20, output[-3000:]


HOSTILE_HEADERS: list[dict[str, str]] = [
    {"last-event-id": "not-a-number"},
    {"last-event-id": "9" * 400},
    {"last-event-id": "-1"},
    {"accept": "application/json"},
    {"cache-control": "\x7f" * 50},
    {"x-pad": "a" * 8000},
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("headers", HOSTILE_HEADERS, ids=range(len(HOSTILE_HEADERS)))
def test_the_stream_answers_hostile_headers_without_5xx(
    stream_url: str, headers: dict[str, str]
) -> None:
    # Bounded: read the status and the first update, then hang up.
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "GET", f"{stream_url}/metrics/active-requests/stream", headers=headers
        ) as response,
    ):
        assert response.status_code < 500
        if response.status_code == 200:
            for line in response.iter_lines():
                if line.startswith("event:"):
                    assert line == "event: update"
                    break


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "path", ["/metrics/active-requests?x=%00%ff", "/metrics?name[]=1", "/readyz/", "/%2e%2e/"]
)
def test_query_and_path_garbage_is_never_a_5xx(stream_url: str, path: str) -> None:
    with httpx.Client(timeout=10) as client:
        response = client.get(stream_url + path)
        assert response.status_code < 500, response.text
        response = client.post(stream_url + "/metrics/active-requests", content=b"\xff" * 10_000)
        assert response.status_code == 405
