"""``vdm-hub instrument -- COMMAND``: the command line, the exec, the ``sitecustomize`` it puts
first on ``PYTHONPATH`` and the uvicorn hook it arms, each in a fresh interpreter (they act at
interpreter start-up, so only a new process shows what they do)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.procs import ROOT, VDM_HUB
from vdm_hub.services.instrument.main import BOOT_DIR, python_path

pytestmark = pytest.mark.timeout(60)


def instrument(
    *command: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VDM_HUB, "instrument", "--", *command],
        capture_output=True,
        text=True,
        timeout=50,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        check=False,
    )


def python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``code`` run by this interpreter under ``vdm-hub instrument``."""
    return instrument(sys.executable, "-c", textwrap.dedent(code), env=env)


def test_python_path_puts_the_boot_directory_first_once() -> None:
    boot = str(BOOT_DIR)
    assert python_path(None) == boot
    assert python_path("") == boot
    assert python_path(f"/a{os.pathsep}{boot}{os.pathsep}{os.pathsep}/b") == os.pathsep.join(
        [boot, "/a", "", "/b"]  # an empty entry (the working directory) is kept as it was
    )
    assert python_path(python_path("/a")) == python_path("/a")


def test_without_a_command_it_says_how_in_one_line() -> None:
    done = subprocess.run(
        [*VDM_HUB, "instrument"], capture_output=True, text=True, timeout=50, check=False
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "vdm-hub instrument: no COMMAND given; usage: "
        "vdm-hub instrument [--log-level LEVEL] -- COMMAND [ARGS...]"
    ]


def test_a_missing_command_is_one_line_and_the_shells_exit_code() -> None:
    done = instrument("no-such-program-vdm")
    assert done.returncode == 127
    assert done.stderr.strip().splitlines() == [
        "vdm-hub instrument: command not found: no-such-program-vdm"
    ]


def test_a_bad_setting_stops_it_before_the_command_runs() -> None:
    done = instrument("true", env={"VDM_WORKER_TTL": "soon"})
    assert done.returncode == 2
    assert "VDM_WORKER_TTL" in done.stderr and done.stdout == ""


def test_the_command_replaces_it_keeping_pid_output_and_exit_code() -> None:
    proc = subprocess.Popen(
        [*VDM_HUB, "instrument", "--", sys.executable, "-c",
         "import os, sys; print(os.getpid()); print(os.environ['PYTHONPATH']); sys.exit(7)"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": "/elsewhere"},
    )  # fmt: skip
    out, _ = proc.communicate(timeout=50)
    assert proc.returncode == 7
    pid, path = out.splitlines()
    assert int(pid) == proc.pid  # exec: the same process, so signals reach the command itself
    assert path == os.pathsep.join([str(BOOT_DIR), "/elsewhere"])


def test_a_process_that_never_imports_uvicorn_pays_for_the_hook_only() -> None:
    done = python(
        """
        import sys
        watched = ("vdm_hub", "starlette", "redis")
        print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in watched)))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "vdm_hub",
        "vdm_hub.services",
        "vdm_hub.services.instrument",
        "vdm_hub.services.instrument.hook",
        "vdm_hub.shared",
    ]


def test_uvicorn_wraps_the_app_it_loads_once_however_often_it_is_armed() -> None:
    done = python(
        """
        import vdm_hub
        from vdm_hub.services.instrument import hook
        import uvicorn.config

        async def app(scope, receive, send):
            pass

        hook.install()  # armed again: nothing changes
        config = uvicorn.config.Config(app=app, lifespan="off")
        config.load()
        loaded = config.loaded_app
        print(loaded is not app, vdm_hub.instrument(loaded) is loaded)
        hook.patch_config(uvicorn.config)
        print(getattr(uvicorn.config.Config.load, "__wrapped__").__name__)
        """
    )
    assert done.returncode == 0, done.stderr
    # Wrapped, and already instrumented (instrument() leaves it as it is); load was
    # replaced once: the replacement wraps uvicorn's own load, not another replacement.
    assert done.stdout.split() == ["True", "True", "load"]


def test_the_sitecustomize_it_hides_still_runs(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['THEIRS_RAN'] = 'yes'\n")
    done = python(
        """
        import os, sys
        print(os.environ.get("THEIRS_RAN"), "vdm_hub.services.instrument.hook" in sys.modules)
        """,
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["yes", "True"]


def test_an_interpreter_without_vdm_hub_says_so_and_runs_the_command(tmp_path: Path) -> None:
    # The virtualenv's base interpreter does not see this virtualenv's packages.
    base = getattr(sys, "_base_executable", sys.executable)
    probe = subprocess.run([base, "-c", "import vdm_hub"], capture_output=True, cwd=tmp_path)
    if probe.returncode == 0:
        pytest.skip(f"{base} can import vdm_hub itself")
    done = subprocess.run(
        [*VDM_HUB, "instrument", "--", base, "-c", "print('served')"],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
        check=False,
    )
    assert done.returncode == 0
    assert done.stdout == "served\n"
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"vdm-hub instrument: {base} cannot import vdm_hub")
    assert line.endswith("install vdm-hub in the environment that runs the app")


def test_a_bad_setting_in_a_serving_process_stops_it_as_uvicorn_would() -> None:
    # The command checked the environment already; a process of the tree that changed it
    # still fails in one line naming the variable, with uvicorn's start-up failure code.
    done = python(
        """
        import os
        os.environ["VDM_WORKER_TTL"] = "soon"
        import uvicorn.config

        async def app(scope, receive, send):
            pass

        uvicorn.config.Config(app=app, lifespan="off").load()
        """
    )
    assert done.returncode == 3
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("vdm-hub instrument: configuration error: VDM_WORKER_TTL")
    )
