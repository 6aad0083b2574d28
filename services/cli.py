"""The ``vdm-hub`` console script: one sub-command per service.

Each sub-command lives in its own module exposing ``configure(parser)`` and
``run(args, settings) -> int``; only the chosen one is imported, so ``vdm-hub worker`` does not
pay for importing Dash, and runs where only the core package is installed (the stream service
and the dashboard come with extras: a missing one is named in one line). Settings are read once
here: a bad value stops start-up with a message naming the variable (exit code 2), as a bad
option value does (``shared/options.py``). ``--help`` of each command lists the environment
variables it reads, from the settings' own field metadata.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from vdm_hub.shared import __version__
from vdm_hub.shared.options import OneLineParser, log_level
from vdm_hub.shared.serve import PortInUse, configure_logging
from vdm_hub.shared.settings import ConfigError, Settings, variables_read_by

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": (
        "vdm_hub.services.up",
        "the whole system on one machine (Redis, workers, stream, dashboard)",
    ),
    "redis": ("vdm_hub.services.redis_server", "the embedded Redis server in the foreground"),
    "worker": (
        "vdm_hub.services.proxy.main",
        "one instrumented worker proxy in front of an upstream",
    ),
    "stream": ("vdm_hub.services.stream.main", "one stream service (merged fleet state over SSE)"),
    "dashboard": ("vdm_hub.dashboard.main", "the Dash dashboard"),
    "demo-upstream": (
        "vdm_hub.services.demo.upstream",
        "a fake OpenAI/Anthropic-compatible LLM API",
    ),
    "load": ("vdm_hub.services.demo.load", "a bounded traffic generator"),
    "instrument": (
        "vdm_hub.services.instrument.main",
        "run COMMAND with every ASGI app uvicorn serves in it publishing (-- COMMAND ARGS)",
    ),
}


# The install extra each command needs beyond the core (pyproject.toml).
EXTRAS: dict[str, str] = {"up": "all", "stream": "stream", "dashboard": "dashboard"}


def _top_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="vdm-hub",
        description="Redis-backed live metrics hub for fleets of HTTP/LLM proxy workers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<14} {text}" for name, (_, text) in COMMANDS.items())
        + "\n\nRun `vdm-hub COMMAND --help` for a command's options and environment variables.",
    )
    parser.add_argument("--version", action="version", version=f"vdm-hub {__version__}")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    return parser


def environment_help(command: str) -> str:
    """The ``--help`` epilog: the variables ``command`` reads (``shared/settings.py``)."""
    found = variables_read_by(command)
    if not found:
        return "environment: reads none of the hub's settings"
    width = max(len(name) for name, _ in found) + 2
    lines = [f"  {name:<{width}}[{default}]" for name, default in found]
    head = "environment variables (read at start-up; README, section Settings):"
    return "\n".join([head, *lines])


def _command_parser(name: str, text: str) -> OneLineParser:
    parser = OneLineParser(
        prog=f"vdm-hub {name}",
        description=text,
        epilog=environment_help(name),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level", type=log_level, default="INFO", metavar="LEVEL", help="logging level [INFO]"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(args_in)
    except SystemExit as exc:  # argparse: --help and --version (0), a bad value (2)
        return exc.code if isinstance(exc.code, int) else 2


def _main(args_in: list[str]) -> int:
    top = _top_parser()
    if not args_in:
        top.print_help(sys.stderr)
        return 2
    if args_in[0] not in COMMANDS:
        top.parse_args(args_in[:1])  # --help, --version, or one line naming the bad command
        return 2
    name, rest = args_in[0], args_in[1:]
    module_name, text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] == "vdm_hub" or name not in EXTRAS:
            raise
        extra = EXTRAS[name]
        print(
            f"vdm-hub {name}: needs the '{extra}' extra (no module named {exc.name!r}): "
            f"pip install 'vdm-hub[{extra}]'",
            file=sys.stderr,
        )
        return 2
    parser = _command_parser(name, text)
    module.configure(parser)
    args = parser.parse_args(rest)
    configure_logging(args.log_level)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"vdm-hub {name}: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        return int(module.run(args, settings))
    except ConfigError as exc:
        print(f"vdm-hub {name}: configuration error: {exc}", file=sys.stderr)
        return 2
    except PortInUse as exc:
        print(f"vdm-hub {name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
