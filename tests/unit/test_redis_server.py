"""The embedded Redis of `dejavu up` and the tests (dejavu/redis_server.py), a real redis-server."""

from __future__ import annotations

import pytest

from dejavu.redis_server import RedisServer


def test_an_embedded_redis_on_a_taken_port_says_so():
    """Another Redis answering on the port is not ours: RedisServer waits for its own process
    (INFO's process_id), which exits, and says why (its log)."""
    first = RedisServer()
    try:
        with pytest.raises(RuntimeError, match="Address already in use"):
            RedisServer(port=first.port)
    finally:
        first.stop()
