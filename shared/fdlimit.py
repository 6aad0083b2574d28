"""The open-file limit: raised to the hard limit at start, and what it allows.

Every socket is a file descriptor. The soft ``RLIMIT_NOFILE`` is often 1024 while the hard
limit is far higher; a stream service that serves more clients than the soft limit allows
fails ``accept()`` with ``EMFILE``: connections are reset and even ``/healthz`` stops
answering (issue 20, case 8). So each service raises its soft limit to the hard one before it
listens (``shared/serve.py``), and the stream service caps ``VDM_MAX_SSE_CLIENTS`` to what is
left after a reserve for everything else (Redis connections, health probes, pollers, logs),
so that clients past the cap get a 503 with ``Retry-After`` instead.
"""

from __future__ import annotations

import contextlib
import logging
import resource

log = logging.getLogger("vdm.fdlimit")

# Descriptors kept for everything but SSE clients: the listening socket, Redis connections,
# health probes and pollers, the interpreter's own files.
FD_RESERVE = 64
# Where the hard limit is "unlimited", the kernel still caps a process (fs.nr_open, 2**20 by
# default); asking for more fails.
_UNLIMITED_TARGET = 1 << 20


def open_file_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _UNLIMITED_TARGET if soft == resource.RLIM_INFINITY else soft


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (logged); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open-file limit raised from %d to %d (the hard limit)", soft, target)
    return open_file_limit()


def clients_allowed(wanted: int, limit: int, what: str) -> int:
    """``wanted`` clients, or fewer if ``limit`` descriptors (less the reserve) cannot hold
    them; a cap is logged with both numbers and ``what`` names the setting."""
    fits = max(1, limit - FD_RESERVE)
    if wanted <= fits:
        return wanted
    log.warning(
        "%s=%d is more than the open-file limit allows: capped at %d (limit %d, %d kept for "
        "everything else); raise the hard limit (ulimit -Hn, LimitNOFILE=, docker --ulimit "
        "nofile=) to serve more",
        what,
        wanted,
        fits,
        limit,
        FD_RESERVE,
    )
    return fits
