"""API keys on the OpenAI surface (--api-key / DEJAVU_API_KEYS): with keys set, /v1/* and /cluster
answer 401 (OpenAI's error body) to a call without a valid bearer key, change nothing, and serve
one that has it, through the official SDK too; /health and /metrics stay open for probes."""

from __future__ import annotations

import httpx
import openai
import pytest

from dejavu.cluster import Cluster
from tests.cluster.conftest import CLUSTER_ENV, metric

KEYS = ("sk-first-key", "sk-second-key")


@pytest.fixture(scope="module")
def cluster(tiny_model_path, redis_server):
    env = {**CLUSTER_ENV, "DEJAVU_KV_TRANSPORT": "tcp", "DEJAVU_COLOCATED": "true", "DEJAVU_API_KEYS": ",".join(KEYS)}
    with Cluster(str(tiny_model_path), port=0, prompt_services=0, token_services=1, cache_stores=0,
                 redis_url=redis_server.url, env=env, echo_logs=False) as c:
        yield c


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-first-key"},
                                     {"Authorization": "Basic sk-first-key"}, {"Authorization": "Bearer"},
                                     {"Authorization": "Bearer sk-first-key-and-more"}])
@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", "/v1/completions"),
                                         ("POST", "/v1/chat/completions"), ("GET", "/cluster")])
def test_calls_without_a_valid_key_get_401_and_change_nothing(cluster, headers, method, path):
    body = {"prompt": "hi", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    resp = httpx.request(method, cluster.url + path, headers=headers, json=body if method == "POST" else None, timeout=30)
    assert resp.status_code == 401, resp.text
    assert resp.headers["www-authenticate"] == "Bearer"
    error = resp.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error" and error["param"] is None
    assert "Bearer" in error["message"]
    assert metric(cluster.of("token")[0].url, "dejavu_token_sequences") == 0


def test_each_key_is_served_and_probes_need_none(cluster):
    for key in KEYS:
        resp = httpx.post(cluster.url + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}, timeout=60)
        assert resp.status_code == 200, resp.text
    assert httpx.get(cluster.url + "/cluster", headers={"Authorization": f"bearer {KEYS[1]}"}, timeout=10).status_code == 200
    assert httpx.get(cluster.url + "/health", timeout=10).status_code == 200
    assert "dejavu_" in httpx.get(cluster.url + "/metrics", timeout=10).text


def test_openai_sdk_with_and_without_the_key(cluster):
    good = openai.OpenAI(base_url=cluster.url + "/v1", api_key=KEYS[0], max_retries=0)
    model = good.models.list().data[0].id
    out = good.completions.create(model=model, prompt="Water boils at", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4
    bad = openai.OpenAI(base_url=cluster.url + "/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.completions.create(model=model, prompt="Water boils at", max_tokens=4)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
