"""``vdm-hub instrument -- COMMAND [ARGS...]``: run COMMAND with every ASGI app that uvicorn
serves in its process tree publishing to the hub.

COMMAND replaces this process (``exec``): it keeps the PID, gets signals straight from
whoever sends them, and its exit code is the command's. The only change to its environment
is ``boot/`` first on ``PYTHONPATH`` (see :mod:`vdm_hub.services.instrument`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from vdm_hub.shared.settings import Settings

BOOT_DIR = Path(__file__).resolve().parent / "boot"
USAGE = "vdm-hub instrument [--log-level LEVEL] -- COMMAND [ARGS...]"
NOT_FOUND = 127  # the shell's code for a command it cannot find


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = USAGE
    parser.epilog = (
        "Configuration comes from the environment only (REDIS_URL, VDM_KEY_PREFIX, "
        "VDM_WORKER_ID with {host}, {pid} or {index}, ...), read by each serving process."
    )
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="the program to run, and its arguments"
    )


def python_path(existing: str | None, boot: Path = BOOT_DIR) -> str:
    """``PYTHONPATH`` with ``boot`` first, once (an instrumented command that runs
    ``vdm-hub instrument`` again does not stack it), and the rest as it was."""
    entries = existing.split(os.pathsep) if existing else []
    own = os.path.realpath(boot)
    kept = [e for e in entries if not (e and os.path.realpath(e) == own)]
    return os.pathsep.join([str(boot), *kept])


def run(args: argparse.Namespace, settings: Settings) -> int:
    # The settings were read (and checked) by the caller only so that a bad value fails here,
    # once, naming the variable; each serving process reads its own environment again.
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print(f"vdm-hub instrument: no COMMAND given; usage: {USAGE}", file=sys.stderr)
        return 2
    program = shutil.which(command[0])
    if program is None:
        print(f"vdm-hub instrument: command not found: {command[0]}", file=sys.stderr)
        return NOT_FOUND
    env = {**os.environ, "PYTHONPATH": python_path(os.environ.get("PYTHONPATH"))}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(program, command, env)
    except OSError as exc:  # found and executable, but not a program (exec format error...)
        print(f"vdm-hub instrument: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
    return NOT_FOUND - 1  # 126, the shell's code for a command it found but cannot run
