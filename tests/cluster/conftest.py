"""Clusters of real processes (Redis, token, prompt, cache store, gateway) for the cluster tests."""

from __future__ import annotations

import re

import httpx
import pytest

from dejavu.cluster import Cluster

# Every KV payload through the shared-memory rings (common/kv/shm.py): the tiny model's are smaller
# than the 64 KiB from which the services use them by default. test_transport covers rings off.
CLUSTER_ENV = {"DEJAVU_MAX_SEQS": "8", "DEJAVU_MAX_MODEL_LEN": "1024", "DEJAVU_THREADS": "1",
               "DEJAVU_LOG_LEVEL": "info", "DEJAVU_KV_SHM_MIN_KIB": "0"}


@pytest.fixture(scope="module", params=["tcp", "ucx"])
def tiny_cluster(request, tiny_model_path, redis_server):
    """The tiny model behind the full disaggregated path, once per KV transport."""
    env = {**CLUSTER_ENV, "DEJAVU_KV_TRANSPORT": request.param}
    with Cluster(str(tiny_model_path), port=0, cache_stores=1, redis_url=redis_server.url, env=env,
                 echo_logs=False) as cluster:
        cluster.transport = request.param
        yield cluster
    redis_server_flush(redis_server)


def redis_server_flush(server) -> None:
    import redis

    redis.Redis.from_url(server.url).flushdb()


def metric(url: str, name: str) -> float:
    """One unlabelled sample from a service's Prometheus /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    if match is None:
        raise AssertionError(f"metric {name} not found at {url}/metrics")
    return float(match.group(1))
