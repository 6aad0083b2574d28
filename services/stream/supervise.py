"""Supervision of the stream service's long-lived background tasks.

Each loop (the hub's reader and reaper, the completed-stream reader, the broadcaster's loops)
handles the failures it expects, such as a lost Redis link, by itself. Anything else is a bug,
and a bug must not end a loop silently while ``/readyz`` still says ready: the supervisor
logs it with its traceback, marks the service not ready, and restarts the loop after a
backoff (0.1 s doubling to 10 s; reset once a run lasted ``settle`` seconds). The service is
ready again when the restarted loop has survived ``settle`` seconds. A loop that returns is
treated the same way: none of them is meant to end before shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("vdm.stream.supervise")

BACKOFF_START = 0.1
BACKOFF_MAX = 10.0


def stop_if_cancelled() -> None:
    """Raise CancelledError if the current task has been asked to stop.

    A loop that catches a lost Redis link and goes round again calls this each time round. On
    Python 3.11, ``asyncio.wait_for`` (which redis-py uses) can lose a cancellation that races
    the completion of what it waits for (fixed in 3.12); the loop would then never see it and
    never stop. The task's cancel count keeps the request, so it is checked here.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


@dataclass
class Job:
    name: str
    run: Callable[[], Awaitable[None]]
    # Called after a crash, before the restart (e.g. the hub's reader marks itself unsynced).
    on_crash: Callable[[], None] | None = None
    restarts: int = 0


class TaskSupervisor:
    """Runs jobs as tasks, restarting crashed ones; ``failing`` names those not yet recovered."""

    def __init__(self, *, settle: float = 5.0, backoff_max: float = BACKOFF_MAX) -> None:
        self.settle = settle
        self.backoff_max = backoff_max
        self.jobs: list[Job] = []
        self.failing: set[str] = set()
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def healthy(self) -> bool:
        return not self.failing

    def add(
        self,
        name: str,
        run: Callable[[], Awaitable[None]],
        on_crash: Callable[[], None] | None = None,
    ) -> Job:
        job = Job(name, run, on_crash)
        self.jobs.append(job)
        return job

    def start(self) -> list[asyncio.Task[None]]:
        self.tasks = [asyncio.create_task(self._keep(job), name=job.name) for job in self.jobs]
        return self.tasks

    async def _keep(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        backoff = BACKOFF_START
        while True:
            started = time.monotonic()
            recovered = loop.call_later(self.settle, self.failing.discard, job.name)
            try:
                await job.run()
                problem = "returned"
                log.error("background task %s returned unexpectedly; restarting", job.name)
            except asyncio.CancelledError:
                raise
            except Exception:
                problem = "crashed"
                log.exception("background task %s crashed; restarting", job.name)
            finally:
                recovered.cancel()
            self.failing.add(job.name)
            job.restarts += 1
            if job.on_crash is not None:
                try:
                    job.on_crash()
                except Exception:
                    log.exception("on_crash hook of %s failed", job.name)
            if time.monotonic() - started >= self.settle:
                backoff = BACKOFF_START
            log.warning("restarting %s (%s) in %.2fs", job.name, problem, backoff)
            await asyncio.sleep(backoff)
            backoff = min(self.backoff_max, backoff * 2)

    async def stop(self, timeout: float = 1.0) -> None:
        """Cancel every task and await them, bounded by ``timeout``."""
        for task in self.tasks:
            task.cancel()
        if not self.tasks:
            return
        _done, pending = await asyncio.wait(self.tasks, timeout=timeout)
        for task in pending:
            log.warning("shutdown: task %s did not stop within %.1f s", task.get_name(), timeout)
        for task in _done:
            with contextlib.suppress(asyncio.CancelledError):
                task.result()
