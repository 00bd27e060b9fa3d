"""Issue #10 item 3: every service listens only where it was told (--host 127.0.0.1, and this
machine's own non-loopback address when it has one). After one request (KV moved prompt ->
token service, replicated), each process's listening sockets are listed (psutil) and checked,
over both KV transports.

Over UCX too: its connections are set up over a TCP rendezvous on the configured address (ucxx's
own listener binds 0.0.0.0 and is not used), and UCX's own TCP transport, which otherwise opens
sockets on every network device, is kept to the device of --host (UCX_NET_DEVICES).
"""

from __future__ import annotations

import httpx
import psutil
import pytest

from dejavu.cluster import Cluster
from tests.cluster.conftest import CLUSTER_ENV


def listening(pid: int) -> list[tuple[str, int]]:
    return [(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN]


def external_ipv4() -> list[str]:
    """This machine's non-loopback IPv4 addresses (the first one), to bind a cluster to."""
    import socket

    addresses = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                 if a.family == socket.AF_INET and not a.address.startswith("127.")]
    return addresses[:1]


HOSTS = ["127.0.0.1", *external_ipv4()]
# TCP on loopback, the setting every other cluster test runs, is left to the full run where this
# machine has another address to check TCP's listeners on (CI's time budget)
CASES = [pytest.param(t, h, marks=pytest.mark.full) if (t, h) == ("tcp", "127.0.0.1") and len(HOSTS) > 1 else (t, h)
         for t in ("tcp", "ucx") for h in HOSTS]


@pytest.mark.parametrize("transport, host", CASES)
def test_every_listener_binds_the_configured_interface(tiny_model_path, redis_server, transport, host):
    env = {**CLUSTER_ENV, "DEJAVU_KV_TRANSPORT": transport}
    with Cluster(str(tiny_model_path), port=0, cache_stores=1, redis_url=redis_server.url, env=env,
                 echo_logs=False, host=host) as cluster:
        body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        assert httpx.post(cluster.url + "/v1/completions", json=body, timeout=60).status_code == 200  # KV moved
        for child in cluster.children:
            sockets = listening(child.pid)
            assert sockets, child.name
            elsewhere = [s for s in sockets if s[0] != host]
            assert not elsewhere, (child.name, sockets)
