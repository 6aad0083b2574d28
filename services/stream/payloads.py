"""The JSON payloads of the stream: ``update`` (the full snapshot) and ``delta``.

Built by joining bytes that were encoded once (rows by the row table, the worker list once
per publish), so a payload costs a join, not an ``orjson.dumps`` of every row. Field names
and shapes are the stream's HTTP contract, documented in ``docs/protocol.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from vdm_hub.services.stream.frames import DISABLED_MESSAGE, DISABLED_SUGGESTION

if TYPE_CHECKING:
    from vdm_hub.services.stream.hub import Hub

# (who is there and in what state, how many requests each holds)
WorkerSignature = tuple[tuple[tuple[Any, ...], ...], tuple[int, ...]]


def worker_list(hub: Hub) -> list[dict[str, Any]]:
    """Every known worker, by id. O(workers): ``active`` is the size of its row dict.
    ``cancellable`` tells the dashboard on whose rows to offer Cancel."""
    workers = []
    for wid in sorted(hub.workers):
        view = hub.workers[wid]
        record = view.record
        workers.append(
            {
                "worker_id": wid,
                "host": record["host"] if record else "",
                "pid": record["pid"] if record else 0,
                "started_at": record["started_at"] if record else None,
                "last_seen": view.last_seen,
                "status": view.status,
                "active": len(view.rows),
                "cancellable": view.cancellable,
            }
        )
    return workers


def signature(workers: list[dict[str, Any]]) -> WorkerSignature:
    """What makes the worker list "changed" for a delta: all but ``last_seen``, which moves
    with every heartbeat and is refreshed in the next snapshot or worker change anyway.
    Membership and status come apart from the ``active`` counts, which move with every
    start and end."""
    members = tuple(
        (w["worker_id"], w["host"], w["pid"], w["started_at"], w["status"], w["cancellable"])
        for w in workers
    )
    return members, tuple(w["active"] for w in workers)


def timestamp(now: float) -> bytes:
    return orjson.dumps(round(now, 3))


def snapshot(
    rows_json: bytes, workers_json: bytes, now: float, version: int, *, sync: bytes
) -> bytes:
    """``sync``: the hub's ``"sync":…,"sync_since":…,"sync_reason":…`` fields, pre-encoded."""
    return (
        b'{"disabled":false,"active_requests":'
        + rows_json
        + b',"workers":'
        + workers_json
        + b',"timestamp":'
        + timestamp(now)
        + b',"version":%d,' % version
        + sync
        + b"}"
    )


def disabled_snapshot(now: float) -> bytes:
    return orjson.dumps(
        {
            "disabled": True,
            "message": DISABLED_MESSAGE,
            "suggestion": DISABLED_SUGGESTION,
            "active_requests": [],
            "workers": [],
            "timestamp": round(now, 3),
            "version": 0,
        }
    )


def delta(
    version: int,
    base: int,
    upsert_json: bytes,
    remove: list[str],  # row keys (``services/stream/table.py``), not request ids
    now: float,
    workers_json: bytes | None,
    *,
    sync: bytes,
) -> bytes:
    """Every delta carries ``sync`` (as :func:`snapshot`), so a change of it needs no rows."""
    tail = b"}" if workers_json is None else b',"workers":' + workers_json + b"}"
    return (
        b'{"version":%d,"base":%d,"upsert":' % (version, base)
        + upsert_json
        + b',"remove":'
        + orjson.dumps(remove)
        + b',"timestamp":'
        + timestamp(now)
        + b","
        + sync
        + tail
    )
