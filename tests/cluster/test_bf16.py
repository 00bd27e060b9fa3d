"""bfloat16 end to end: bf16 weights, activations and KV on prompt and token services, bf16 KV over
UCX, bf16 replicas on the cache store and bf16 restores. In bf16 the oracle is the same request
without a failure: a token service killed mid-stream changes nothing, greedy or seeded."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from dejavu.cluster import Cluster
from tests.cluster.conftest import CLUSTER_ENV, metric
from tests.cluster.test_failover import PROMPT, assert_no_kv_held_on, stream_with_fault


@pytest.fixture(scope="module")
def cluster(tiny_model_path, redis_server):
    env = {**CLUSTER_ENV, "DEJAVU_KV_TRANSPORT": "ucx", "DEJAVU_TOKEN_TIMEOUT_S": "3", "DEJAVU_DTYPE": "bfloat16"}
    with Cluster(str(tiny_model_path), port=0, token_services=2, cache_stores=1, redis_url=redis_server.url,
                 env=env, echo_logs=False) as c:
        yield c


@pytest.mark.parametrize("body", [
    {"max_tokens": 400, "temperature": 0},
    {"max_tokens": 300, "temperature": 0.8, "top_p": 0.95, "seed": 11, "ignore_eos": True},
], ids=["greedy", "seeded"])
def test_a_killed_token_service_changes_nothing_in_bf16(cluster, body):
    body = {"prompt": PROMPT, **body}
    deadline = time.monotonic() + 30  # the case before killed a token service: listed until its lease lapses
    while len(engines := [s for s in httpx.get(cluster.url + "/cluster", timeout=10).json()["services"]
                          if s["kind"] in ("prompt", "token")]) != 3:
        assert time.monotonic() < deadline, [s["id"] for s in engines]
        time.sleep(0.1)
    assert {s["dtype"] for s in engines} == {"bfloat16"}
    recoveries = metric(cluster.url, 'dejavu_gateway_recoveries_total{path="replica"}')
    clean, clean_usage, _ = stream_with_fault(cluster, body, None)
    failed, usage, victims = stream_with_fault(cluster, body, signal.SIGKILL, after=60)
    assert victims, "the fault was never injected"
    assert failed == clean and usage["prompt_tokens"] == clean_usage["prompt_tokens"]
    assert usage["completion_tokens"] == clean_usage["completion_tokens"]  # cached_tokens: the second run may hit
    assert metric(cluster.url, 'dejavu_gateway_recoveries_total{path="replica"}') == recoveries + 1
    respawned = cluster.respawn(victims[0])  # back to two token services for the next case
    cluster.wait_ready(120, [respawned])
    assert_no_kv_held_on(cluster)
