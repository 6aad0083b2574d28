"""Smoke tests of the benchmark harness: tiny versions of the scenarios run end to end, and the
view client's parsing is checked on bytes. No numbers asserted: benchmarks measure, tests only
check that the machinery works (docs/performance.md)."""

from __future__ import annotations

import math
import os
from typing import Any

import orjson
import pytest

from bench import peer
from bench.browserload import CHROMIUM
from bench.fanout import fanout
from bench.fidelity import fidelity
from bench.paint import paint
from bench.report import Result, Table, Verdict
from bench.rows import rows_scenario
from bench.rowwatch import Pool, Watcher
from bench.vandamme_cost import KINDS, SIDES, vandamme_cost
from bench.viewclient import Shared, View
from bench.vsvandamme import vs_vandamme
from vdm_hub.services.stream.table import row_key


@pytest.mark.system
@pytest.mark.timeout(45)
async def test_tiny_fanout_runs_end_to_end_and_every_client_ends_on_the_final_row() -> None:
    r = await fanout(clients=4, rate=20, changes=5, client_procs=1)
    assert r.connected == 4
    assert r.final_ok == 4  # each client's last update holds exactly the last row
    assert not math.isnan(r.p50)  # arrivals were matched to changes


@pytest.mark.system
@pytest.mark.timeout(90)
async def test_tiny_fidelity_run_compares_the_view_with_the_truth_and_ends_empty() -> None:
    r = await fidelity(workers=1, conns=12, rate=40, hold=(0.5, 1.0), steady_s=1.5)
    assert r.samples and r.peak_truth > 0
    assert r.requests >= 12 and r.errors == 0
    assert r.never_seen == 0 and r.ghosts == 0  # every request was shown, nothing else was
    assert r.final_ok, r.final_detail
    assert r.reaped == 0 and r.workers_lost == 0
    assert all(len(s.load_per_worker) == len(s.worker_in_flight) == 1 for s in r.samples)


@pytest.mark.system
@pytest.mark.timeout(90)
async def test_tiny_rows_run_takes_both_modes_and_every_view_ends_on_the_truth() -> None:
    runs, page = await rows_scenario(
        levels=[30], churn_rate=40, delta_clients=5, snapshot_clients=3, window_s=1.0
    )
    assert page is None  # no browser asked for
    assert [(r.rows, r.mode) for r in runs] == [(30, "delta"), (30, "snapshot")]
    for r in runs:
        assert r.connected == r.clients
        assert r.gaps == 0
        assert r.final_ok == r.tracking > 0
        assert r.seen > 0
    delta, snapshot = runs
    assert delta.deltas > 0 and snapshot.deltas == 0


@pytest.mark.system
@pytest.mark.browser
@pytest.mark.timeout(120)
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}")
async def test_tiny_first_paint_run_measures_both_sides_of_a_baseline() -> None:
    r = await paint(
        levels=[60], churn_rate=20, loads=1, settle_s=0.2, churn_s=0.5, baseline_ref="HEAD"
    )
    assert [s.label for s in r.sides] == ["today", f"baseline {r.baseline}"]
    for side in r.sides:
        assert side.errors == [] and len(side.ok) == 1
        load = side.ok[0]
        assert 0 < load.first_rows_ms <= load.complete_ms
        assert load.grid_rows >= 55  # every row, up to what the churn moved
        assert load.churn_s > 0.4


@pytest.mark.system
@pytest.mark.timeout(120)
async def test_tiny_side_by_side_with_vandamme_when_it_is_installed() -> None:
    if not peer.installed():
        pytest.skip("vandamme-proxy is not in the bench cache (python -m bench installs it)")
    r = await vs_vandamme(workers=1, clients=3, held=2, probes=6, spacing=0.1)
    for side in r.sides.values():
        assert side.probes == 3 and side.errors == 0
        assert side.missed == 0 and side.stuck == 0
        assert side.final_rows == [2, 2]  # the background rows, nothing left over
        assert side.appear and side.gone


@pytest.mark.system
@pytest.mark.timeout(180)
async def test_tiny_vandamme_cost_when_it_is_installed() -> None:
    if not peer.installed():
        pytest.skip("vandamme-proxy is not in the bench cache (python -m bench installs it)")
    c = await vandamme_cost(concurrency=2, round_s=0.5, pairs=1)
    for kind in KINDS:
        rounds = c.rounds[kind]
        assert rounds.errors == 0
        for side in SIDES:  # (CPU is read in 10 ms ticks: a tiny round may show none)
            assert len(rounds.rps[side]) == 2 and min(rounds.rps[side]) > 0


def _chunked(frames: list[bytes]) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    head += b"transfer-encoding: chunked\r\n\r\n"
    return head + b"".join(b"%x\r\n%s\r\n" % (len(f), f) for f in frames)


def _frame(event: str, body: dict[str, Any], version: int) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (version, event.encode(), orjson.dumps(body))


def _row(rid: str, model: str | None = "m") -> dict[str, Any]:
    return {
        "request_id": rid,
        "key": _key(rid),
        "model": model,
        "phase": "upstream",
        "bytes_out": 0,
    }


def _key(rid: str) -> str:
    return row_key("w", rid)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("piece", [1, 7, 4096])
def test_view_client_applies_snapshot_and_deltas_split_anywhere(piece: int) -> None:
    raw = _chunked(
        [
            _frame("update", {"active_requests": [_row("a"), _row("b")], "version": 1}, 1),
            b": heartbeat\n\n",
            _frame(
                "delta", {"version": 2, "base": 1, "upsert": [_row("c")], "remove": [_key("a")]}, 2
            ),
            _frame("delta", {"version": 4, "base": 3, "upsert": [_row("d")], "remove": []}, 4),
        ]
    )
    shared = Shared("\0")
    view = View(shared, b"", stamps=True)
    for i in range(0, len(raw), piece):
        view.data_received(raw[i : i + piece])
    assert set(view.rows) == {_key("b"), _key("c")}  # the delta with the wrong base was not applied
    assert (view.version, view.gaps, view.frames) == (2, 1, 3)  # the heartbeat is no frame
    assert set(shared.first) == {"a", "b", "c"} and set(shared.gone) == {"a"}
    assert view.waiting_for_update  # until the next full update


@pytest.mark.timeout(10)
def test_view_client_keeps_one_request_id_on_two_workers_apart() -> None:
    dup = [{**_row("dup"), "worker_id": w, "key": row_key(w, "dup")} for w in ("w1", "w2")]
    raw = _chunked(
        [
            _frame("update", {"active_requests": dup, "version": 1}, 1),
            _frame("delta", {"version": 2, "base": 1, "remove": [row_key("w1", "dup")]}, 2),
        ]
    )
    view = View(Shared("\0"), b"", stamps=False)
    view.data_received(raw)
    assert [(r["worker_id"], r["request_id"]) for r in view.rows.values()] == [("w2", "dup")]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("piece", [1, 7, 4096])
def test_row_watcher_on_deltas_stamps_the_model_and_the_removal(piece: int) -> None:
    raw = _chunked(
        [
            _frame("update", {"active_requests": [_row("a", "held")], "version": 1}, 1),
            _frame("delta", {"version": 2, "base": 1, "upsert": [_row("p", None)]}, 2),
            _frame("delta", {"version": 3, "base": 2, "upsert": [_row("p", "tok")]}, 3),
            b": heartbeat\n\n",
            _frame("delta", {"version": 4, "base": 3, "remove": [_key("p")]}, 4),
            _frame("delta", {"version": 9, "base": 7, "remove": [_key("a")]}, 9),
            # A new snapshot (a resync) without the held row removes it too.
            _frame("update", {"active_requests": [], "version": 10}, 10),
        ]
    )
    pool = Pool()
    pool.known.update({"held", "tok"})
    pool.seen[b"tok"], pool.gone[b"tok"] = [], []
    pool.seen[b"held"], pool.gone[b"held"] = [], []
    watcher = Watcher(pool, b"", track=True, delta=True)
    watcher.pending.update({b"tok", b"held"})
    for i in range(0, len(raw), piece):
        watcher.data_received(raw[i : i + piece])
    assert len(pool.seen[b"tok"]) == 1 and len(pool.gone[b"tok"]) == 1
    assert pool.gone[b"tok"][0] >= pool.seen[b"tok"][0]
    # The row shown before its model was known is a violation; the unappliable delta a gap.
    assert (pool.violations, pool.violating) == (1, {"p"})
    assert (watcher.gaps, watcher.version, watcher.last_models) == (1, 10, [])
    assert len(pool.seen[b"held"]) == 1 and len(pool.gone[b"held"]) == 1


def test_result_renders_as_text_and_markdown() -> None:
    result = Result("x", "X")
    table = Table("t", ["a", "b"])
    table.add(1, 2.5)
    result.tables.append(table)
    result.verdicts.append(Verdict("target", "measured", True))
    assert "| 1 | 2.5 |" in result.markdown("python -m bench", "now")
    assert "[met] target: measured" in result.text()
