"""The command line as a user meets it: help, version, and one line per bad value.

Every case goes through ``main(argv)`` in-process; only the busy Redis port runs a real process
(what it must clean up is a real server's temp dir).
"""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import pytest

from tests.procs import ROOT, Proc, wait_for
from vdm_hub.services.cli import COMMANDS, main
from vdm_hub.shared import __version__
from vdm_hub.shared.settings import variables_read_by

pytestmark = pytest.mark.timeout(30)

# TEST-NET-1 (RFC 5737): never an address of this machine.
FOREIGN_ADDRESS = "192.0.2.1"


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: vdm-hub") and "commands:" in err
    assert all(name in err for name in COMMANDS)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"vdm-hub {__version__}"


def test_an_unknown_command_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sream"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "'sream'" in lines[0] and "choose from" in lines[0]


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["stream", "--port", "70000"], "--port"),
        (["worker", "--upstream", "http://127.0.0.1:9", "--port", "-1"], "--port"),
        (["dashboard", "--port", "http"], "--port"),
        (["stream", "--log-level", "bogus"], "--log-level"),
        (["redis", "--host", FOREIGN_ADDRESS], "--host"),
        (["demo-upstream", "--host", "no-such-host.invalid"], "--host"),
        (["up", "--host", FOREIGN_ADDRESS], "--host"),
        (["up", "--workers", "0"], "--workers"),
        (["up", "--stream-port", "99999"], "--stream-port"),
        (["up", "--demo-rate", "-1"], "--demo-rate"),
        (["worker", "--upstream", "localhost:8001"], "--upstream"),
        (["load", "--target", "localhost:8080"], "--target"),
        (["load", "--target", "http://127.0.0.1:9", "--stream-share", "2"], "--stream-share"),
        (["load", "--target", "http://127.0.0.1:9", "--concurrency", "0"], "--concurrency"),
        (["demo-upstream", "--chunks", "many"], "--chunks"),
    ],
)
def test_a_bad_option_value_is_one_line_naming_the_option(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"vdm-hub {argv[0]}: argument {option}")


def test_load_explains_a_target_without_a_scheme(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load", "--target", "localhost:8080"]) == 2
    assert "(e.g. http://localhost:8080)" in capsys.readouterr().err


def _listed(help_text: str) -> list[str]:
    section = help_text.split("environment variables", 1)[1]
    return re.findall(r"^  ([A-Z][A-Z_]+) ", section, flags=re.MULTILINE)


@pytest.mark.parametrize("command", ["worker", "stream", "dashboard", "up"])
def test_help_lists_the_variables_the_command_reads(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    listed = _listed(capsys.readouterr().out)
    assert listed == [name for name, _ in variables_read_by(command)]
    assert "REDIS_URL" in listed or command == "dashboard"


def test_help_lists_each_variable_where_it_is_read(capsys: pytest.CaptureFixture[str]) -> None:
    main(["worker", "--help"])
    worker = _listed(capsys.readouterr().out)
    main(["stream", "--help"])
    stream = _listed(capsys.readouterr().out)
    assert "VDM_WORKER_ID" in worker and "VDM_WORKER_ID" not in stream
    assert "VDM_CORS_ORIGINS" in stream and "VDM_CORS_ORIGINS" not in worker
    main(["load", "--help"])
    assert "reads none of the hub's settings" in capsys.readouterr().out


def test_the_readme_settings_table_lists_exactly_the_variables() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([A-Z][A-Z_]+)` \|", table, flags=re.MULTILINE)
    assert sorted(documented) == sorted(name for name, _ in variables_read_by("up"))


@pytest.mark.system
def test_redis_on_a_busy_port_says_so_and_leaves_no_temp_dir(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    temp = tmp_path / "tmp"
    temp.mkdir()
    argv = [sys.executable, "-m", "vdm_hub.services.cli", "redis", "--port", str(port)]
    proc = Proc(argv, env={"TMPDIR": str(temp)}, name="redis")
    try:
        wait_for(lambda: proc.popen.poll() is not None, 20, message="exit on a busy port")
        assert proc.popen.returncode == 1
        lines = [line for line in proc.output.splitlines() if line.strip()]
        assert lines == [
            f"vdm-hub redis: port {port} on 127.0.0.1 is in use: choose another with --port "
            f"(0: a free one), or, if that is a Redis you want to use, point the hub at it with "
            f"REDIS_URL=redis://127.0.0.1:{port}/0"
        ]
        assert list(temp.iterdir()) == []
    finally:
        proc.stop()
        holder.close()
