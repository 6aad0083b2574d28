"""``vdm-hub redis``: the embedded Redis in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType

from vdm_hub.shared.embedded_redis import (
    EmbeddedRedis,
    RedisBinaryNotFound,
    RedisPortInUse,
    RedisStartError,
)
from vdm_hub.shared.options import listen_host, port
from vdm_hub.shared.serve import PortInUse, warn_if_open
from vdm_hub.shared.settings import Settings

log = logging.getLogger("vdm.redis")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", type=listen_host, default="127.0.0.1", help="bind address [127.0.0.1]"
    )
    parser.add_argument("--port", type=port, default=6379, help="port, 0 for a free one [6379]")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="keep data here (append-only file); by default nothing is kept on disk",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    stop = threading.Event()

    def on_signal(sig: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        server = EmbeddedRedis(host=args.host, port=args.port, data_dir=args.data_dir).start()
    except RedisPortInUse as exc:
        url = f"redis://{args.host}:{args.port}/0"
        raise PortInUse(
            f"{exc}: choose another with --port (0: a free one), or, if that is a Redis you "
            f"want to use, point the hub at it with REDIS_URL={url}"
        ) from None
    except (RedisBinaryNotFound, RedisStartError) as exc:
        log.error("%s", exc)
        return 1
    try:
        log.info("redis ready on %s (%s)", server.url, server.binary)
        # Started with protected mode and no password, the server itself refuses clients
        # from other machines: say so rather than let a remote worker time out puzzled.
        warn_if_open(
            "redis",
            args.host,
            server.url,
            "no password is set either, so Redis's protected mode refuses clients from other "
            "machines; for a fleet across machines run your own Redis with a password "
            "(REDIS_URL)",
        )
        while not stop.is_set():
            if server.process is None or server.process.poll() is not None:
                log.error("redis server exited unexpectedly")
                return 1
            stop.wait(0.5)
        return 0
    finally:
        server.stop()
