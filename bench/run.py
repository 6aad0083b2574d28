"""``python -m bench [--scenario NAME ...] [--quick] [--no-write]``: run the benchmarks.

Each scenario starts its own processes on loopback, is bounded in time and count, prints its
tables, and (unless ``--no-write``; ``--quick`` runs never write) replaces its block in the
results section of ``docs/performance.md`` together with the exact command and the conditions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import shlex
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

from bench import baseline, scenarios
from bench.procs import CPUS
from bench.report import Result, write_doc
from bench.soak import soak

SCENARIOS: dict[str, Callable[[bool], Awaitable[Result]]] = {
    "e2e": scenarios.end_to_end,
    "fanout": scenarios.fan_out,
    "overhead": scenarios.worker_overhead,
    "events": scenarios.event_throughput,
    "scaling": scenarios.scaling,
    "fidelity": scenarios.view_fidelity,
    "rows": scenarios.rows_in_flight,
    "soak": soak,
}


def conditions() -> str:
    load = os.getloadavg()
    return (
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {CPUS} cores, Python "
        f"{platform.python_version()}, load average before the run {load[0]:.2f}"
    )


def raise_fd_limit() -> None:
    """Thousands of sockets per process; children inherit the raised soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run_all(names: Sequence[str], quick: bool) -> list[Result]:
    results = []
    for name in names:
        t0 = time.monotonic()
        print(f"--- {name} ({'quick' if quick else 'full'}) ...", flush=True)
        result = await SCENARIOS[name](quick)
        print(result.text(), flush=True)
        print(f"--- {name} took {time.monotonic() - t0:.0f} s\n", flush=True)
        results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        help="run only this scenario (repeatable) [all]",
    )
    parser.add_argument("--quick", action="store_true", help="tiny, short runs (development)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="overhead, events: also run the worker / stream service of git commit REF side by"
        " side (bench/baseline.py)",
    )
    args = parser.parse_args(argv)
    if args.baseline:
        os.environ[baseline.REF_ENV] = args.baseline
    raise_fd_limit()
    names = args.scenario or list(SCENARIOS)
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    before = conditions()
    t0 = time.monotonic()
    results = asyncio.run(run_all(names, args.quick))
    total = time.monotonic() - t0
    print(f"total {total:.0f} s")
    if not (args.quick or args.no_write):
        write_doc(results, command.strip(), f"{before}; this scenario set took {total:.0f} s")
        print("results written to docs/performance.md")
    return 0
