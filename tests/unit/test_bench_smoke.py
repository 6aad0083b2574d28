"""Smoke test of the benchmark harness: a tiny fan-out runs end to end. No numbers asserted:
benchmarks measure, tests only check that the machinery works (design.md section 7)."""

from __future__ import annotations

import math

import pytest

from bench.fanout import fanout
from bench.report import Result, Table, Verdict

pytestmark = pytest.mark.system


@pytest.mark.timeout(45)
async def test_tiny_fanout_runs_end_to_end_and_every_client_ends_on_the_final_row() -> None:
    r = await fanout(clients=4, rate=20, changes=5, client_procs=1)
    assert r.connected == 4
    assert r.final_ok == 4  # each client's last update holds exactly the last row
    assert not math.isnan(r.p50)  # arrivals were matched to changes


def test_result_renders_as_text_and_markdown() -> None:
    result = Result("x", "X")
    table = Table("t", ["a", "b"])
    table.add(1, 2.5)
    result.tables.append(table)
    result.verdicts.append(Verdict("target", "measured", True))
    assert "| 1 | 2.5 |" in result.markdown("python -m bench", "now")
    assert "[met] target: measured" in result.text()
