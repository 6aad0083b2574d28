"""services/supervisor.py on tiny Python children: echo, failure reports, staged stop, clean-up.

The whole of ``vdm-hub up`` on real services is tests/system/test_up.py; these pin down the
supervisor's own rules in a second or two.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from vdm_hub.services.supervisor import Supervisor
from vdm_hub.shared.children import ChildFailed, Stopped

pytestmark = pytest.mark.timeout(30)


def service(name: str) -> list[str]:
    """A child that logs its ready line; on SIGTERM it adds its name to $ORDER and exits 0."""
    code = f"""
        import os, signal, sys, time
        def stop(*_):
            if "ORDER" in os.environ:
                with open(os.environ["ORDER"], "a") as order:
                    order.write("{name}\\n")
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        print("quiet noise")
        print("{name} ready on http://127.0.0.1:1/" + os.environ["TMPDIR"])
        while True:
            time.sleep(0.02)
    """
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_children_are_echoed_with_their_name_muted_lines_kept_and_stopped_in_stages(
    tmp_path: Path,
) -> None:
    echo = io.StringIO()
    sup = Supervisor(echo=echo, mute=re.compile("noise"), stop_timeout=10)
    tmpdir = sup.tmpdir
    env = {**os.environ, "ORDER": str(tmp_path / "order")}
    try:
        first = sup.start("first", service("first"), env)
        second = sup.start("second", service("second"), env)
        assert first.url == f"http://127.0.0.1:1/{tmpdir}"  # TMPDIR points into the run's dir
    finally:
        sup.stop([[second], [first]])
    assert (first.poll(), second.poll()) == (0, 0)
    lines = echo.getvalue().splitlines()
    assert "first | first ready on http://127.0.0.1:1/" + tmpdir in lines
    assert not any("noise" in line for line in lines)  # muted on the console ...
    assert "quiet noise" in first.tail()  # ... but kept for a failure report
    # A stage is stopped only once the one before it has exited.
    assert (tmp_path / "order").read_text().split() == ["second", "first"]
    assert not Path(tmpdir).exists()


def test_a_child_that_exits_while_watched_is_reported_with_its_code_and_output() -> None:
    sup = Supervisor(echo=None)
    try:
        sup.start("steady", service("steady"), dict(os.environ))
        code = "print('dying ready on http://x'); print('out of cheese', flush=True); exit(4)"
        sup.start("dying", [sys.executable, "-c", code], dict(os.environ), wait_ready=False)
        with pytest.raises(ChildFailed) as failed:
            sup.watch(poll_interval=0.02)
    finally:
        sup.stop()
    assert failed.value.child.name == "dying"
    assert failed.value.reason == "exited with code 4 unexpectedly"
    assert "  out of cheese" in failed.value.report()


def test_a_stop_request_ends_a_ready_wait_and_refuses_new_children() -> None:
    sup = Supervisor(echo=None)
    try:
        slow = [sys.executable, "-c", "import time; time.sleep(60)"]
        child = sup.start("slow", slow, dict(os.environ), wait_ready=False)
        timer = threading.Timer(0.2, sup.request_stop)
        timer.start()
        with pytest.raises(Stopped):
            child.wait_ready(20, sup.stop_event)
        timer.join()
        with pytest.raises(Stopped):
            sup.start("late", slow, dict(os.environ))
    finally:
        sup.stop()
    assert child.poll() is not None


def test_children_the_process_had_before_the_supervisor_are_not_swept() -> None:
    """In a process that already has children (a test session's Redis), stopping a supervisor
    leaves them alone: only orphans re-parented to it are its to sweep."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sup = Supervisor(echo=None)
        sup.start("steady", service("steady"), dict(os.environ))
        sup.stop()
        assert bystander.poll() is None, "the supervisor swept a child it did not start"
    finally:
        bystander.kill()
        bystander.wait(10)
