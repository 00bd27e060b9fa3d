"""Issue #10 item 3: every service listens only where it was told (--host 127.0.0.1 here). Each
process's listening sockets are listed (psutil) and checked, over both KV transports.

Over UCX too: its connections are set up over a TCP rendezvous on the configured address (ucxx's
own listener binds 0.0.0.0 and is not used), and UCX's own TCP transport, which otherwise opens
sockets on every network device, is kept to `lo` (UCX_NET_DEVICES).
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
            assert not elsewhere, (child.name, sockets)
