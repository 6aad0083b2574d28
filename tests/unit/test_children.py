"""shared/children.py on real (tiny Python) child processes: ready waits, failure reports, stop."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tests.procs import wait_for
from vdm_hub.shared.children import Child, ChildFailed, Stopped

pytestmark = pytest.mark.timeout(30)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def child(code: str, **kwargs: object) -> Child:
    return Child("kid", python(code), dict(os.environ), **kwargs)  # type: ignore[arg-type]


SERVES = """
    import signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("starting")
    print("kid ready on http://127.0.0.1:1234")
    while True:
        time.sleep(0.05)
"""


def test_wait_ready_returns_the_url_of_the_ready_line_and_stop_ends_the_child_cleanly() -> None:
    kid = child(SERVES)
    try:
        assert kid.wait_ready(20) == "http://127.0.0.1:1234"
        assert kid.url == "http://127.0.0.1:1234"
        assert kid.wait_for_line(r"^start(\w+)", 5).group(1) == "ing"
    finally:
        code = kid.stop(10)
    assert code == 0
    assert kid.output.splitlines()[:2] == ["starting", "kid ready on http://127.0.0.1:1234"]
    assert kid.popen.stdout is not None and kid.popen.stdout.closed


def test_a_child_that_exits_first_fails_the_wait_with_its_exit_code_and_last_output() -> None:
    kid = child("print('no config: VDM_X is not a number'); raise SystemExit(3)")
    try:
        with pytest.raises(ChildFailed) as failed:
            kid.wait_ready(20)
    finally:
        kid.stop()
    assert failed.value.child is kid
    assert failed.value.reason == "exited with code 3 before it was ready"
    assert "  no config: VDM_X is not a number" in failed.value.report()
    assert "VDM_X" in str(failed.value)


def test_a_child_that_never_gets_ready_fails_the_wait_at_the_deadline() -> None:
    kid = child("import time; print('thinking'); time.sleep(60)")
    try:
        with pytest.raises(ChildFailed, match=r"was not ready within 0\.5s"):
            kid.wait_ready(0.5)
        with pytest.raises(ChildFailed, match=r"logged no line matching 'never' within 0\.2s"):
            kid.wait_for_line("never", 0.2)
        assert kid.poll() is None  # a failed wait leaves stopping to the owner
    finally:
        kid.stop(5)


def test_a_stop_request_cuts_the_wait_short() -> None:
    stop = threading.Event()
    stop.set()
    kid = child("import time; time.sleep(60)")
    try:
        with pytest.raises(Stopped):
            kid.wait_ready(20, stop)
    finally:
        kid.stop(5)


def test_stop_kills_a_child_that_ignores_sigterm_and_its_process_group() -> None:
    kid = child(
        """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(f"helper {helper.pid}", flush=True)
        time.sleep(60)
        """
    )
    helper = int(kid.wait_for_line(r"helper (\d+)", 20).group(1))
    code = kid.stop(0.5)
    assert code == -signal.SIGKILL
    # The helper shares the child's process group, so it was SIGKILLed too: it dies (a signal
    # takes a moment to land) and is a zombie or gone (its parent died, and init reaps it).
    wait_for(lambda: _dead(helper), 10, message=f"the helper {helper} to die")


def test_a_child_that_exits_on_sigterm_still_has_its_group_killed_before_it_is_reaped() -> None:
    """A helper left behind in the group dies even when the child itself exits in time."""
    kid = child(
        """
        import signal, subprocess, sys, time
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leaves the helper running
        print(f"helper {helper.pid}", flush=True)
        time.sleep(60)
        """
    )
    helper = int(kid.wait_for_line(r"helper (\d+)", 20).group(1))
    assert kid.stop(10) == 0
    wait_for(lambda: _dead(helper), 10, message=f"the helper {helper} to die")


def test_a_reaped_child_s_group_id_is_never_signalled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once reaped, the child's pid (its group's id) may belong to a new process: pids wrap."""
    kid = child("print('bye')")
    assert kid.wait(20) == 0  # exited and reaped
    signalled: list[int] = []
    monkeypatch.setattr(os, "killpg", lambda pgid, sig: signalled.append(pgid))
    assert kid.stop(1) == 0
    assert signalled == []


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def test_sigterm_is_sent_once_so_a_graceful_shutdown_is_not_cut_short() -> None:
    kid = child(
        """
        import signal, sys, time
        terms = []
        def on_term(*_):
            terms.append(1)
            print(f"terms {len(terms)}", flush=True)
        signal.signal(signal.SIGTERM, on_term)
        print("kid ready on http://x")
        while len(terms) < 2:
            time.sleep(0.02)
        """
    )
    kid.wait_ready(20)
    kid.terminate()
    kid.terminate()
    kid.wait_for_line("terms 1", 10)
    assert kid.stop(0.5) == -signal.SIGKILL  # it waited for a second SIGTERM that never came
    assert "terms 2" not in kid.output


def test_on_line_sees_every_line_while_keep_bounds_what_is_kept() -> None:
    seen: list[str] = []
    kid = child("for i in range(100): print(f'line {i}')", keep=10, on_line=seen.append)
    assert kid.wait(20) == 0
    kid.close()
    assert seen == [f"line {i}" for i in range(100)]
    assert kid.tail() == [f"line {i}" for i in range(90, 100)]
    assert kid.wait_for_line(r"line 9\d", 1).group(0) == "line 90"  # the first one kept


def test_a_child_logging_to_a_file_reports_its_tail_from_the_file(tmp_path: Path) -> None:
    log = tmp_path / "kid.log"
    kid = child("print('to the file'); raise SystemExit(2)", log=log)
    with pytest.raises(ChildFailed, match="exited with code 2") as failed:
        kid.wait_for_line("never", 20)
    assert kid.stop() == 2
    assert "  to the file" in failed.value.report()
    assert log.read_text() == "to the file\n"
    with pytest.raises(ValueError, match="no ready wait"):
        kid.wait_ready(1)
