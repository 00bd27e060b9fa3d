"""Redis unreachable: streams in flight finish from memory, new requests get a 503 with the OpenAI
error body, and once Redis is back (empty) the services re-register and serving resumes."""

from __future__ import annotations

import json
import time

import httpx

from dejavu.cluster import Cluster
from dejavu.redis_server import RedisServer
from tests.cluster.conftest import CLUSTER_ENV

GOOD = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}


def test_redis_outage_and_return(tiny_model_path):
    redis = RedisServer()
    port = redis.port
    env = {**CLUSTER_ENV, "DEJAVU_KV_TRANSPORT": "tcp"}
    cluster = Cluster(str(tiny_model_path), port=0, cache_stores=0, redis_url=redis.url, env=env, echo_logs=False)
    try:
        cluster.start()
        body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
        chunks = []
        with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                    if len(chunks) == 5:
                        redis.stop()  # Redis goes away mid-stream
        assert "error" not in chunks[-1] and chunks[-1]["choices"][0]["finish_reason"] == "length"

        resp = httpx.post(cluster.url + "/v1/completions", json=GOOD, timeout=30)
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["type"] == "service_unavailable"
        assert_plain(resp.json()["error"]["message"])
        resp = httpx.get(cluster.url + "/cluster", timeout=30)
        assert resp.status_code == 503 and resp.json()["error"]["type"] == "service_unavailable", resp.text
        assert_plain(resp.json()["error"]["message"])
        assert all(c.proc.poll() is None for c in cluster.children), "a service died with Redis"

        redis = RedisServer(port=port)  # back, and empty: leases re-register within a renewal
        deadline = time.monotonic() + 30
        while (resp := httpx.post(cluster.url + "/v1/completions", json=GOOD, timeout=30)).status_code != 200:
            assert time.monotonic() < deadline, resp.text
            time.sleep(0.5)
        assert resp.json()["usage"]["completion_tokens"] == 4
    finally:
        cluster.stop()
        redis.stop()


def assert_plain(message: str) -> None:
    """A client's 5xx says what happened, not where: no internal address, no Redis error text."""
    for needle in ("127.0.0.1", "http://", "redis", "Redis", "Error", "onnect"):
        assert needle not in message, message
