"""`vdm-hub load` against a real `vdm-hub demo-upstream` process, as a user runs them."""

from __future__ import annotations

import re
import shlex
import signal

import pytest

from tests.procs import VDM_HUB, Proc, vdm_hub

pytestmark = pytest.mark.system

SUMMARY = re.compile(r"load summary: sent=(\d+) ok=(\d+) failed=(\d+) cancelled=(\d+)")


@pytest.mark.timeout(40)
def test_load_cli_runs_for_its_duration_and_prints_a_summary() -> None:
    upstream = vdm_hub("demo-upstream", "--port", "0", "--latency", "0.01", "--chunk-delay", "0")
    try:
        url = upstream.wait_ready()
        load = vdm_hub(
            "load",
            "--target",
            url,
            "--duration",
            "2",
            "--rate",
            "50",
            "--concurrency",
            "5",
            "--shape",
            "mixed",
        )
        try:
            match = load.wait_for_line(SUMMARY, timeout=25)
            assert load.popen.wait(10) == 0, load.output
        finally:
            load.stop()
        sent, ok, failed, cancelled = (int(g) for g in match.groups())
        assert sent > 10 and ok == sent and failed == 0 and cancelled == 0, load.output
        assert re.search(
            r"load: +\d+\.\ds sent=\d+ ok=\d+ failed=0 in_flight=\d+ rps=", load.output
        )
    finally:
        assert upstream.stop() == 0, upstream.output


@pytest.mark.timeout(30)
def test_load_cli_exits_1_when_every_request_fails() -> None:
    upstream = vdm_hub("demo-upstream", "--port", "0", "--latency", "0", "--error-rate", "1")
    try:
        url = upstream.wait_ready()
        load = vdm_hub("load", "--target", url, "--requests", "3", "--rate", "0")
        try:
            match = load.wait_for_line(SUMMARY, timeout=20)
            assert load.popen.wait(10) == 1, load.output
        finally:
            load.stop()
        assert match.group(3) == "3"
        assert "http_500=3" in load.output
    finally:
        upstream.stop()


@pytest.mark.timeout(30)
def test_load_cli_stops_on_sigint_cancelling_held_requests() -> None:
    upstream = vdm_hub("demo-upstream", "--port", "0")
    try:
        url = upstream.wait_ready()
        # --duration 0: runs until stopped, as `vdm-hub up` uses it for demo traffic.
        load = vdm_hub(
            "load", "--target", url, "--duration", "0", "--concurrency", "3", "--hold", "30"
        )
        try:
            load.wait_for_line(r"in_flight=3 ", timeout=15)
            load.signal(signal.SIGINT)
            match = load.wait_for_line(SUMMARY, timeout=10)
            assert load.popen.wait(10) == 0, load.output
        finally:
            load.stop()
        assert match.groups() == ("3", "0", "0", "3"), load.output
    finally:
        assert upstream.stop() == 0, upstream.output


@pytest.mark.timeout(40)
def test_load_cli_caps_concurrency_to_the_open_file_limit_and_says_so() -> None:
    upstream = vdm_hub("demo-upstream", "--port", "0", "--latency", "0", "--chunk-delay", "0")
    try:
        url = upstream.wait_ready()
        # `ulimit -n` in the shell lowers the hard limit too, so the CLI cannot raise it.
        command = shlex.join([*VDM_HUB, "load", "--target", url, "--requests", "20"])
        load = Proc(
            ["sh", "-c", f"ulimit -n 200 && exec {command} --concurrency 5000 --rate 0"],
            name="vdm-hub load",
        )
        try:
            match = load.wait_for_line(SUMMARY, timeout=25)
            assert load.popen.wait(10) == 0, load.output
        finally:
            load.stop()
        assert re.search(r"concurrency capped at 136 \(was 5000\)", load.output), load.output
        assert "concurrency=136 (client pool: 136 connections)" in load.output
        assert match.groups() == ("20", "20", "0", "0"), load.output
    finally:
        assert upstream.stop() == 0, upstream.output
