"""Real processes for the benchmarks: start one, read its URL, pin it, read its CPU and memory.

Two kinds, both children of the bench driver that whoever started them stops, so a failing
scenario leaves nothing behind: ``vdm-hub`` services (:class:`Service`, a
:class:`shared.children.Child` ready when it logs its URL, stopped with SIGTERM then SIGKILL by
the :class:`Fleet` that started it), and the bench's own helper processes (load and SSE
clients) on asyncio pipes, driven by line commands (:class:`CommandProcess`, whose ``close``
ends them; each helper's body runs under :func:`run_pinned`).

CPU and memory come from ``/proc`` (Linux): ``utime + stime`` ticks of ``/proc/PID/stat`` and
``VmRSS`` of ``/proc/PID/status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from vdm_hub.shared.children import Child
from vdm_hub.shared.embedded_redis import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1
NOTABLE = (
    " WARNING ",
    " ERROR ",
    "reaped worker",
    "re-register",
    "Traceback",
    "unreachable",
    "broke off",
)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the ")" that closes comm: field 3 is index 0, so utime (14) and stime (15).
    return (int(fields[11]) + int(fields[12])) / TICKS


def runqueue_wait(pid: int) -> float:
    """Seconds the process's threads spent runnable but waiting for a core (schedstat)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(stat.read_text().split()[1])
    return total / 1e9


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pin(pid: int, cpus: Sequence[int] | None) -> None:
    """Pin to ``cpus`` (ignored where the machine has fewer; None leaves it free)."""
    if cpus is None:
        return
    usable = {c for c in cpus if c < CPUS}
    if usable:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, usable)


class CpuMeter:
    """CPU seconds used by a set of processes between ``start()`` and ``stop()``."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._before: dict[int, float] = {}
        self._waited: dict[int, float] = {}
        self._t0 = 0.0
        self.cpu = 0.0
        self.wall = 0.0
        self.waited = 0.0  # seconds runnable but not running: other processes had the core

    def start(self) -> CpuMeter:
        self._before = {pid: cpu_seconds(pid) for pid in self.pids}
        self._waited = {pid: runqueue_wait(pid) for pid in self.pids}
        self._t0 = time.monotonic()
        return self

    def stop(self) -> CpuMeter:
        self.wall = time.monotonic() - self._t0
        self.cpu = sum(cpu_seconds(pid) - before for pid, before in self._before.items())
        self.waited = sum(runqueue_wait(pid) - w for pid, w in self._waited.items())
        return self

    @property
    def share(self) -> float:
        """Cores used on average (1.0 = one core busy all the time)."""
        return self.cpu / self.wall if self.wall > 0 else 0.0


class Service(Child):
    """One ``vdm-hub`` sub-command running as a child process, pinned to ``cpus``."""

    def __init__(
        self,
        command: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        cpus: Sequence[int] | None = None,
        root: Path = ROOT,
    ) -> None:
        # Warnings, errors and reaps over the whole run (the kept tail forgets them).
        self.notable: list[str] = []
        super().__init__(
            command,
            # ``-m`` puts the working directory first on sys.path: a ``root`` holding another
            # commit's tree (bench/baseline.py) runs that code, with this virtualenv.
            [sys.executable, "-m", "vdm_hub.services.cli", command, *args],
            {**os.environ, **(env or {})},
            cwd=root,
            keep=200,  # the tail only: a chatty child must not grow us
            on_line=self._note,
        )
        pin(self.pid, cpus)

    @property
    def url(self) -> str:
        """From the ready line: a :class:`Fleet` hands a service out only once it is ready."""
        url = super().url
        assert url is not None, f"{self.name} is not ready"
        return url

    def _note(self, line: str) -> None:
        if len(self.notable) < 5000 and any(m in line for m in NOTABLE):
            self.notable.append(line)


def run_pinned(cpus: str, main: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """A helper process's body: pin to ``cpus`` ("0,1"; empty leaves it free), run ``main``."""
    if cpus:
        pin(os.getpid(), [int(c) for c in cpus.split(",")])
    import uvloop  # ships with uvicorn[standard]

    uvloop.run(main())
    return 0


class CommandProcess:
    """The driver's handle on a helper process (``python -m MODULE``) run by commands.

    A command is one line on the helper's stdin and its answer one line on its stdout: JSON,
    or a bare word (``ok``, ``closed``). ``close`` sends ``close`` and waits, bounded, for the
    helper to finish, then kills it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def spawn(self, module: str, *args: str, limit: int = 64 << 20) -> None:
        """``limit``: the longest answer line (a report of every stamp can be large)."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            *args,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=limit,
        )

    def send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

    async def drain(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        await self.proc.stdin.drain()

    async def answer(self) -> Any:
        assert self.proc is not None and self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} process exited")
        try:
            return orjson.loads(line)
        except orjson.JSONDecodeError:
            return line.strip().decode()

    async def command(self, line: str, timeout: float = 30) -> Any:
        self.send(line)
        await self.drain()
        async with asyncio.timeout(timeout):
            return await self.answer()

    async def close(self, timeout: float = 15) -> None:
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(Exception):  # answered, or the helper is gone already
            await self.command("close", timeout)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


# What start_many starts: (sub-command, its arguments, its environment, CPUs to pin it to).
Spec = tuple[str, Sequence[str], Mapping[str, str], Sequence[int] | None]


class Fleet:
    """Everything one scenario starts; ``close()`` stops it in reverse order."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.redis: EmbeddedRedis | None = None
        self.services: list[Service] = []

    def start_redis(self, cpus: Sequence[int] | None = None) -> str:
        self.redis = EmbeddedRedis().start()
        assert self.redis.process is not None
        pin(self.redis.process.pid, cpus)
        return self.redis.url

    @property
    def redis_pid(self) -> int:
        assert self.redis is not None and self.redis.process is not None
        return self.redis.process.pid

    def env(self, **extra: str) -> dict[str, str]:
        assert self.redis is not None
        return {"REDIS_URL": self.redis.url, "VDM_KEY_PREFIX": self.prefix, **extra}

    def start(
        self,
        command: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        cpus: Sequence[int] | None = None,
        root: Path = ROOT,
    ) -> Service:
        service = Service(command, "--port", "0", *args, env=env, cpus=cpus, root=root)
        self.services.append(service)
        service.wait_ready()
        return service

    def hub_specs(
        self, upstream: str, workers: int, *worker_args: str, id_prefix: str = "w"
    ) -> list[Spec]:
        """``workers`` workers (ids ``{id_prefix}0``...) in front of ``upstream``, then the
        stream service: for :meth:`start_many`, whose answer keeps this order."""
        specs: list[Spec] = [
            (
                "worker",
                ["--upstream", upstream, *worker_args],
                self.env(VDM_WORKER_ID=f"{id_prefix}{i}"),
                None,
            )
            for i in range(workers)
        ]
        specs.append(("stream", [], self.env(), None))
        return specs

    def start_many(self, specs: Sequence[Spec]) -> list[Service]:
        """Start several at once (they import in parallel), then wait for each."""
        started = []
        for command, args, env, cpus in specs:
            service = Service(command, "--port", "0", *args, env=env, cpus=cpus)
            self.services.append(service)
            started.append(service)
        for service in started:
            service.wait_ready()
        return started

    def stop(self, service: Service) -> None:
        service.stop()
        self.services.remove(service)

    def close(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.services.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


@contextlib.contextmanager
def fleet(prefix: str) -> Iterator[Fleet]:
    f = Fleet(prefix)
    try:
        yield f
    finally:
        f.close()


class Profiler:
    """``py-spy record`` attached to one process, summarised as self and total time per function.

    py-spy is a dev dependency; without it (or without ptrace permission) ``summary()`` says so
    instead of failing the run.
    """

    def __init__(self, pid: int, out: Path, rate: int = 250, nonblocking: bool = False) -> None:
        self.out = out
        self.error = ""
        exe = Path(sys.executable).with_name("py-spy")
        args = [str(exe), "record", "-p", str(pid), "-r", str(rate), "-f", "raw", "-o", str(out)]
        if nonblocking:  # do not pause the target to sample it (less skew, rarer odd stacks)
            args.append("--nonblocking")
        try:
            self.popen: subprocess.Popen[bytes] | None = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            self.popen = None
            self.error = f"py-spy not available: {exc}"

    def stop(self) -> None:
        if self.popen is None:
            return
        self.popen.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            _, err = self.popen.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            _, err = self.popen.communicate()
        if not self.out.exists():
            self.error = err.decode(errors="replace").strip()[-300:] or "py-spy wrote nothing"

    def summary(self, top: int = 12) -> list[tuple[str, float, float]]:
        """(function, self %, total %) for the functions with the most self time."""
        if self.error or not self.out.exists():
            return []
        own: dict[str, int] = {}
        total: dict[str, int] = {}
        samples = 0
        for line in self.out.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = stack.split(";")
            samples += count
            leaf = _frame_name(frames[-1])
            own[leaf] = own.get(leaf, 0) + count
            for name in {_frame_name(fr) for fr in frames}:
                total[name] = total.get(name, 0) + count
        if not samples:
            return []
        ranked = sorted(own.items(), key=lambda kv: kv[1], reverse=True)[:top]
        return [(name, 100 * n / samples, 100 * total[name] / samples) for name, n in ranked]


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)": keep function and file.
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(Path(path).parts[-2:]) if path else ""
    return f"{name} ({short})" if short else name
