"""``python -m bench [--scenario NAME ...] [--quick] [--write]``: run the benchmarks.

Each scenario starts its own processes on loopback, is bounded in time and count and prints
its tables. Only with ``--write`` (never with ``--quick``) does it replace its block in the
results section of the tracked ``docs/performance.md``, together with the exact command and
the conditions: a user reproducing the figures should not find the repository modified.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

from bench import baseline, scenarios
from bench.procs import CPUS
from bench.report import Result, write_doc
from bench.shards import cluster_shards
from bench.soak import soak
from bench.vandamme_cost import instrumenting_vandamme
from vdm_hub.shared.fdlimit import raise_open_file_limit

SCENARIOS: dict[str, Callable[[bool], Awaitable[Result]]] = {
    "e2e": scenarios.end_to_end,
    "fanout": scenarios.fan_out,
    "overhead": scenarios.worker_overhead,
    "events": scenarios.event_throughput,
    "scaling": scenarios.scaling,
    "fidelity": scenarios.view_fidelity,
    "rows": scenarios.rows_in_flight,
    "soak": soak,
    "shards": cluster_shards,
    "vandamme": instrumenting_vandamme,
    "browser": scenarios.dashboard_paint,
}


def conditions() -> str:
    load = os.getloadavg()
    return (
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {CPUS} cores, Python "
        f"{platform.python_version()}, load average before the run {load[0]:.2f}"
    )


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
    parser.add_argument(
        "--write",
        action="store_true",
        help="replace the scenarios' blocks in docs/performance.md with this run's results",
    )
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="overhead, events, rows, browser, vandamme: also run git commit REF's worker,"
        " stream service, dashboard or vdm_hub (instrumenting vandamme-proxy) side by side"
        " (bench/baseline.py)",
    )
    args = parser.parse_args(argv)
    if args.baseline:
        os.environ[baseline.REF_ENV] = args.baseline
    raise_open_file_limit()  # thousands of sockets per process; children inherit it
    names = args.scenario or list(SCENARIOS)
    given = sys.argv[1:] if argv is None else list(argv)
    # The recorded command is the one that reproduces the figures: without --write.
    command = "python -m bench " + shlex.join(a for a in given if a != "--write")
    before = conditions()
    t0 = time.monotonic()
    results = asyncio.run(run_all(names, args.quick))
    total = time.monotonic() - t0
    print(f"total {total:.0f} s")
    if args.write and not args.quick:
        write_doc(results, command.strip(), f"{before}; this scenario set took {total:.0f} s")
        print("results written to docs/performance.md")
    elif args.write:
        print("--quick runs are not written to docs/performance.md")
    return 0
