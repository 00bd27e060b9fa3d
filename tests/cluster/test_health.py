"""The gateway's /health is a readiness probe: 503 with the reason until a request can be routed
(a token service, and a prompt service or a colocated token service, registered), 200 after, 503
again when Redis is unreachable. A gateway alone, with its own Redis; services join one by one."""

from __future__ import annotations

import time

import httpx

from dejavu.cluster import Cluster
from tests.cluster.conftest import CLUSTER_ENV


def health(cluster) -> tuple[int, dict]:
    resp = httpx.get(cluster.url + "/health", timeout=10)
    return resp.status_code, resp.json()


def wait_health(cluster, status: int, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        code, body = health(cluster)
        if code == status or time.monotonic() > deadline:
            assert code == status, body
            return body
        time.sleep(0.2)


def test_gateway_health_says_ready_only_when_it_can_route(tiny_model_path):
    env = {**CLUSTER_ENV, "DEJAVU_KV_TRANSPORT": "tcp"}
    with Cluster(str(tiny_model_path), port=0, prompt_services=0, token_services=0, cache_stores=0, env=env,
                 echo_logs=False) as cluster:
        code, body = health(cluster)
        assert code == 503 and body["status"] == "unavailable" and body["reason"] == "no token service registered"
        assert httpx.head(cluster.url + "/health", timeout=10).status_code == 503  # a load balancer's probe
        token = cluster.spawn("token", "token-0")
        cluster.wait_ready(120, [token])
        body = wait_health(cluster, 503)
        assert "no prompt service" in body["reason"]
        assert httpx.post(cluster.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                          timeout=30).status_code == 503  # what the probe said: nothing can prefill
        prompt = cluster.spawn("prompt", "prompt-0")
        cluster.wait_ready(120, [prompt])
        body = wait_health(cluster, 200)
        assert body["status"] == "ok" and body["token_services"] == 1 and body["prompt_services"] == 1
        head = httpx.head(cluster.url + "/health", timeout=10)
        assert head.status_code == 200 and head.content == b""
        assert httpx.head(prompt.url + "/health", timeout=10).status_code == 200  # every service's
        assert httpx.post(cluster.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                          timeout=60).status_code == 200
        cluster.redis.stop()
        body = wait_health(cluster, 503)
        assert "Redis" in body["reason"]


def test_a_colocated_token_service_alone_is_ready(tiny_model_path):
    env = {**CLUSTER_ENV, "DEJAVU_KV_TRANSPORT": "tcp", "DEJAVU_COLOCATED": "true"}
    with Cluster(str(tiny_model_path), port=0, prompt_services=0, token_services=1, cache_stores=0, env=env,
                 echo_logs=False) as cluster:
        assert wait_health(cluster, 200)["prompt_services"] == 0
