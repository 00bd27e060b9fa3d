"""Issue #10 item 3: every service listens only where it was told (--host 127.0.0.1 here). Each
process's listening sockets are listed (psutil) and checked, over both KV transports.

One exception, over UCX only, and named: ucxx's listener takes no address and binds 0.0.0.0 (its
C++ Listener fills in INADDR_ANY); a stranger who reaches it gets no further than the cluster
token's handshake (common/kv/auth.py). UCX's own TCP transport, which otherwise opens sockets on
every network device, is kept to `lo` (UCX_NET_DEVICES).
"""

from __future__ import annotations

import psutil
import pytest

from dejavu.cluster import Cluster
from tests.cluster.conftest import CLUSTER_ENV


def listening(pid: int) -> list[tuple[str, int]]:
    return [(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN]


@pytest.mark.parametrize("transport", ["tcp", "ucx"])
def test_every_listener_binds_the_configured_interface(tiny_model_path, redis_server, transport):
    env = {**CLUSTER_ENV, "DEJAVU_KV_TRANSPORT": transport}
    with Cluster(str(tiny_model_path), port=0, cache_stores=1, redis_url=redis_server.url, env=env,
                 echo_logs=False) as cluster:
        for child in cluster.children:
            sockets = listening(child.pid)
            assert sockets, child.name
            elsewhere = [s for s in sockets if s[0] != "127.0.0.1"]
            kv_listener = transport == "ucx" and child.kind in ("token", "cache_store")
            if kv_listener:  # ucxx's listener, and nothing else
                assert len(elsewhere) <= 1 and all(ip == "0.0.0.0" for ip, _ in elsewhere), (child.name, sockets)
            else:
                assert not elsewhere, (child.name, sockets)
