"""API keys on the OpenAI surface (--api-key / DEJAVU_API_KEYS): with keys set, every route but the
probes' (/v1/*, /cluster, the OpenAPI pages) answers 401 (OpenAI's error body; Anthropic's on
/v1/messages) to a call without a valid key (a bearer token, or x-api-key), changes nothing, and
serves one that has it, through the official SDKs too;
/health and /metrics stay open for probes. Then the cluster token on internal endpoints."""

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
                                         ("POST", "/v1/chat/completions"), ("GET", "/cluster"),
                                         ("GET", "/openapi.json"), ("GET", "/docs"), ("POST", "/tokenize"),
                                         ("POST", "/v1/messages")])
def test_calls_without_a_valid_key_get_401_and_change_nothing(cluster, headers, method, path):
    body = {"prompt": "hi", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    resp = httpx.request(method, cluster.url + path, headers=headers, json=body if method == "POST" else None, timeout=30)
    assert resp.status_code == 401, resp.text
    assert resp.headers["www-authenticate"] == "Bearer"
    error = resp.json()["error"]
    kind = "authentication_error" if path == "/v1/messages" else "invalid_request_error"  # Anthropic's name there
    assert error["code"] == "invalid_api_key" and error["type"] == kind and error["param"] is None
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


def test_a_browser_page_may_call_the_api_its_key_still_needed(cluster):
    """CORS, as vLLM's and SGLang's by default (any origin): a browser's preflight, which carries no
    key, is answered; the call itself still needs the key, and its answer, 401 or 200, says the page
    may read it."""
    page = {"Origin": "https://playground.example"}
    pre = httpx.options(cluster.url + "/v1/chat/completions", timeout=10, headers={
        **page, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "*", pre.text
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    body = {"prompt": "hi", "max_tokens": 2}
    refused = httpx.post(cluster.url + "/v1/completions", headers=page, json=body, timeout=30)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "*"
    served = httpx.post(cluster.url + "/v1/completions", headers={**page, "Authorization": f"Bearer {KEYS[0]}"},
                        json=body, timeout=60)
    assert served.status_code == 200 and served.headers["access-control-allow-origin"] == "*"
    assert "x-request-id" in served.headers["access-control-expose-headers"]
    assert "access-control-allow-origin" not in httpx.get(cluster.url + "/health", timeout=10).headers  # no Origin: none


def test_openai_sdk_with_and_without_the_key(cluster):
    good = openai.OpenAI(base_url=cluster.url + "/v1", api_key=KEYS[0], max_retries=0)
    model = good.models.list().data[0].id
    out = good.completions.create(model=model, prompt="Water boils at", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4
    bad = openai.OpenAI(base_url=cluster.url + "/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.completions.create(model=model, prompt="Water boils at", max_tokens=4)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"


def test_the_anthropic_sdk_sends_its_key_as_x_api_key_and_is_refused_in_anthropics_words(cluster):
    """x-api-key (Anthropic's header) carries a key as well as a bearer token does, on every route;
    a wrong one on /v1/messages is a 401 whose body the anthropic SDK reads as an authentication
    error (Anthropic's type), and changes nothing."""
    import anthropic

    model = httpx.get(cluster.url + "/v1/models", headers={"x-api-key": KEYS[1]}, timeout=10).json()["data"][0]["id"]
    good = anthropic.Anthropic(base_url=cluster.url, api_key=KEYS[0], max_retries=0, timeout=60)
    out = good.messages.create(model=model, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert out.usage.output_tokens >= 1 and out.content[0].type == "text"
    bad = anthropic.Anthropic(base_url=cluster.url, api_key="sk-nope", max_retries=0, timeout=60)
    with pytest.raises(anthropic.AuthenticationError) as err:
        bad.messages.create(model=model, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert err.value.status_code == 401
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "authentication_error"
    assert "x-api-key" in err.value.body["error"]["message"]
    for headers in ({"x-api-key": "sk-nope"}, {"x-api-key": ""},
                    {"Authorization": "Bearer sk-nope", "x-api-key": KEYS[0]}):
        resp = httpx.post(cluster.url + "/v1/completions", headers=headers, json={"prompt": "hi", "max_tokens": 2},
                          timeout=30)
        assert resp.status_code == 401, (headers, resp.text)  # a wrong bearer token is not saved by x-api-key
    assert metric(cluster.of("token")[0].url, "dejavu_token_sequences") == 0


def test_a_stored_response_is_its_keys_alone(cluster):
    """The Responses API's store: a response made with one key is read, continued and deleted with
    that key only (another key's calls get a 404, as for one never stored)."""
    first = openai.OpenAI(base_url=cluster.url + "/v1", api_key=KEYS[0], max_retries=0, timeout=60)
    second = openai.OpenAI(base_url=cluster.url + "/v1", api_key=KEYS[1], max_retries=0, timeout=60)
    model = first.models.list().data[0].id
    made = first.responses.create(model=model, input="Hi", max_output_tokens=2)
    for call in (lambda: second.responses.retrieve(made.id), lambda: second.responses.delete(made.id),
                 lambda: second.responses.create(model=model, input="Hi", max_output_tokens=2,
                                                 previous_response_id=made.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert first.responses.retrieve(made.id).id == made.id
    first.responses.create(model=model, input="Again", max_output_tokens=2, previous_response_id=made.id)
    first.responses.delete(made.id)


INTERNAL = [("token", "POST", "/reserve", {"request_id": "r1", "prompt_tokens": 4, "max_tokens": 4}),
            ("token", "POST", "/abort", {"request_id": "r1"}),
            ("token", "POST", "/decode", {"request_id": "r1", "replay": [1], "first_token": 1, "sampling": {}}),
            ("cache_store", "POST", "/drop", {"request_id": "r1"}),
            ("cache_store", "GET", "/replicas/r1", None)]


@pytest.fixture(scope="module")
def replicating(tiny_model_path, redis_server):
    """A cluster with a cache store, generating its own cluster token."""
    env = {**CLUSTER_ENV, "DEJAVU_KV_TRANSPORT": "tcp", "DEJAVU_COLOCATED": "true"}
    with Cluster(str(tiny_model_path), port=0, prompt_services=0, token_services=1, cache_stores=1,
                 redis_url=redis_server.url, env=env, echo_logs=False) as c:
        yield c


@pytest.mark.parametrize("kind,method,path,body", INTERNAL, ids=[f"{c[0]}{c[2]}" for c in INTERNAL])
def test_internal_endpoints_need_the_cluster_token(replicating, kind, method, path, body):
    svc = replicating.of(kind)[0]
    held = "dejavu_" + ("token_sequences" if kind == "token" else "cache_store_replicas")
    before = metric(svc.url, held)
    for headers in ({}, {"X-Dejavu-Cluster-Token": "guess"}):
        resp = httpx.request(method, svc.url + path, json=body, headers=headers, timeout=30)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_cluster_token", resp.text
    assert httpx.get(svc.url + "/health", timeout=10).status_code == 200  # probes stay open
    assert metric(svc.url, held) == before  # refused calls changed nothing
    resp = httpx.request(method, svc.url + path, json=body, headers=replicating.internal_headers, timeout=30)
    assert resp.status_code != 401, resp.text
    if path == "/reserve":  # let the room go again
        httpx.post(svc.url + "/abort", json={"request_id": "r1"}, headers=replicating.internal_headers, timeout=30)


def test_the_cluster_serves_and_replicates_with_its_token(replicating):
    """Gateway -> token service (HTTP), token service -> cache store (KV link and /drop): all
    authenticated; a request long enough to replicate finishes and its replica is dropped."""
    resp = httpx.post(replicating.url + "/v1/completions", timeout=60,
                      json={"prompt": "The capital of France is", "max_tokens": 40, "temperature": 0, "ignore_eos": True})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 40, resp.text
    token = replicating.of("token")[0]
    assert metric(token.url, "dejavu_token_replicated_bytes_total") > 0  # acknowledged: the KV handshake passed


def test_redis_keeps_no_prompt_token_ids(replicating, redis_server):
    """Issue #10 item 16: nothing reads a request's token ids back from Redis, so they are not
    kept there (an hour of every prompt); its length is."""
    import redis

    resp = httpx.post(replicating.url + "/v1/completions", timeout=60,
                      json={"prompt": "Secret plans for Tuesday", "max_tokens": 2, "temperature": 0})
    assert resp.status_code == 200, resp.text
    request_id = resp.json()["id"].removeprefix("cmpl-")
    fields = redis.Redis.from_url(redis_server.url, decode_responses=True).hgetall(f"dejavu:req:{request_id}")
    assert fields["prompt_tokens"] == str(resp.json()["usage"]["prompt_tokens"]) and "prompt_ids" not in fields, fields
