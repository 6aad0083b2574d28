"""The embedded Redis calls a server its own only when that server is the process it started."""

from __future__ import annotations

import pytest

from vdm_hub.shared.embedded_redis import EmbeddedRedis, RedisPortInUse

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


def test_a_port_another_server_holds_is_not_taken_for_ours(redis_server: EmbeddedRedis) -> None:
    """Another server answering PING on the port is no proof: ours must be the one answering
    (between choosing a free port and binding it, someone else can take it)."""
    late = EmbeddedRedis(port=redis_server.port)
    try:
        with pytest.raises(RedisPortInUse, match=f"port {redis_server.port} .* is in use"):
            late.start()
        assert late.process is None
        assert late.data_dir is None  # its temp dir went with the failed start
    finally:
        late.stop()  # if it did start (the test failed), it must not outlive the test
