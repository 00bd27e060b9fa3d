"""Every bad input gets the OpenAI error body with the right status, and leaves every service
healthy: a good request right after still works."""

from __future__ import annotations

import httpx
import pytest

from tests.cluster.test_serving import assert_no_kv_held

GOOD = {"prompt": "Hello there", "max_tokens": 4, "temperature": 0}

CASES = [
    # (name, body or raw bytes, status, param)
    ("missing prompt", {"max_tokens": 4}, 400, "prompt"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("empty token list", {"prompt": []}, 400, "prompt"),
    ("token id out of vocabulary", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("an empty prompt in a batch", {"prompt": ["a", ""]}, 400, "prompt"),
    ("a batch of too many prompts", {"prompt": ["a"] * 129}, 400, "prompt"),
    ("a batch of prompts times n over the most choices", {"prompt": ["a"] * 65, "n": 2}, 400, "prompt"),
    ("negative max_tokens", {**GOOD, "max_tokens": -5}, 400, "max_tokens"),
    ("zero max_tokens", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("absurd max_tokens", {**GOOD, "max_tokens": 10**12}, 400, "max_tokens"),
    ("prompt + max_tokens over context", {"prompt": [5] * 1000, "max_tokens": 100}, 400, "max_tokens"),
    ("prompt alone over context", {"prompt": [5] * 5000}, 400, "prompt"),
    ("3.9 MB of text", {"prompt": "a" * 3_900_000}, 400, "prompt"),  # refused by its length, untokenized
    ("negative temperature", {**GOOD, "temperature": -0.1}, 400, "temperature"),
    ("top_p zero", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("top_p above one", {**GOOD, "top_p": 1.5}, 400, "top_p"),
    ("n zero", {**GOOD, "n": 0}, 400, "n"),
    ("n over the most choices", {**GOOD, "n": 129}, 400, "n"),
    ("max_tokens as string", {**GOOD, "max_tokens": "10"}, 400, "max_tokens"),
    ("temperature as string", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("stream as string", {**GOOD, "stream": "yes"}, 400, "stream"),
    ("prompt as number", {"prompt": 42}, 400, "prompt"),
    ("stop as number", {**GOOD, "stop": 7}, 400, "stop"),
    ("logprobs too many", {**GOOD, "logprobs": 50}, 400, "logprobs"),
    ("body is a list", [1, 2, 3], 400, None),
    ("unknown model", {**GOOD, "model": "gpt-17"}, 404, "model"),
]


@pytest.fixture(scope="module")
def url(tiny_cluster):
    return tiny_cluster.url


@pytest.mark.parametrize("name,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_openai_error(url, name, body, status, param):
    resp = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert_openai_error(resp, status, param)


def test_malformed_json(url):
    resp = httpx.post(url + "/v1/completions", content=b'{"prompt": "hi", ', timeout=30,
                      headers={"content-type": "application/json"})
    assert_openai_error(resp, 400, None)
    assert "JSON" in resp.json()["error"]["message"]


def test_json_sent_as_a_form_names_the_header(url):
    """curl -d without -H sends application/x-www-form-urlencoded: the error says what to add."""
    resp = httpx.post(url + "/v1/completions", content=b'{"prompt": "hi"}', timeout=30,
                      headers={"content-type": "application/x-www-form-urlencoded"})
    assert_openai_error(resp, 400, None)
    assert "Content-Type: application/json" in resp.json()["error"]["message"]


def test_oversized_body(url):
    resp = httpx.post(url + "/v1/completions", json={"prompt": "x" * (5 << 20)}, timeout=30)
    assert_openai_error(resp, 413, None)
    assert resp.json()["error"]["code"] == "payload_too_large"


def test_chat_bad_input(url):
    assert_openai_error(httpx.post(url + "/v1/chat/completions", json={"messages": []}, timeout=30), 400, "messages")
    assert_openai_error(httpx.post(url + "/v1/chat/completions", timeout=30,
                                   json={"messages": [{"role": "wizard", "content": "hi"}]}), 400, None)
    for message in ({"role": "user", "content": None}, {"role": "system"}):
        resp = httpx.post(url + "/v1/chat/completions", timeout=30, json={"messages": [message]})
        assert_openai_error(resp, 400, "messages")
        assert "messages[0]" in resp.json()["error"]["message"]


def test_unknown_route_is_openai_404(url):
    assert_openai_error(httpx.get(url + "/v1/nothing", timeout=30), 404, None)


def test_services_healthy_after_bad_input(tiny_cluster, url):
    for case in CASES[:5]:
        httpx.post(url + "/v1/completions", json=case[1], timeout=30)
    resp = httpx.post(url + "/v1/completions", json=GOOD, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] >= 1
    for child in tiny_cluster.children:
        assert httpx.get(child.url + "/health", timeout=10).json()["status"] == "ok", child.name
    assert not tiny_cluster.dead()
    assert_no_kv_held(tiny_cluster)


def assert_openai_error(resp: httpx.Response, status: int, param: str | None) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"] and isinstance(error["message"], str)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error


def test_oversized_chunked_body_without_length(url):
    def body():
        yield b'{"prompt": "'
        for _ in range(6):
            yield b"x" * (1 << 20)
        yield b'"}'

    resp = httpx.post(url + "/v1/completions", content=body(), timeout=30, headers={"content-type": "application/json"})
    assert_openai_error(resp, 413, None)
    assert resp.json()["error"]["code"] == "payload_too_large"  # as with a Content-Length (a probe saw null)


RAW_CASES = [
    # (name, raw JSON body, status, param): what json.dumps would never write, a hostile client might
    ("lone surrogate in prompt", b'{"prompt": "hi \\ud800 there", "max_tokens": 2}', 400, "prompt"),
    ("lone surrogate in model", b'{"model": "\\udfff", "prompt": "hi", "max_tokens": 2}', 400, "model"),
    ("lone surrogate in stop", b'{"prompt": "hi", "max_tokens": 2, "stop": ["\\ud800"]}', 400, "stop"),
    ("NaN temperature", b'{"prompt": "hi", "max_tokens": 2, "temperature": NaN}', 400, "temperature"),
    ("Infinity top_p", b'{"prompt": "hi", "max_tokens": 2, "top_p": Infinity}', 400, "top_p"),
    ("huge integer max_tokens", b'{"prompt": "hi", "max_tokens": 1' + b"0" * 400 + b"}", 400, "max_tokens"),
    ("deeply nested prompt", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
]


@pytest.mark.parametrize("name,raw,status,param", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_hostile_json_gets_openai_error(url, name, raw, status, param):
    resp = httpx.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert_openai_error(resp, status, param)


def test_chat_surrogate_gets_openai_error(url):
    raw = b'{"messages": [{"role": "user", "content": "hi \\udc00"}], "max_tokens": 2}'
    resp = httpx.post(url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert_openai_error(resp, 400, None)


def test_stop_strings_are_capped(url):
    assert_openai_error(httpx.post(url + "/v1/completions", json={**GOOD, "stop": ["x" * 5000]}, timeout=30), 400, "stop")
    assert_openai_error(httpx.post(url + "/v1/completions", json={**GOOD, "stop": [str(i) for i in range(17)]},
                                   timeout=30), 400, "stop")


def test_a_denormal_temperature_is_greedy(url):
    """1e-320 is > 0, so it samples; dividing logits by it overflowed to inf and NaN probabilities
    picked garbage. A temperature this small is greedy in all but name: it must answer as greedy."""
    greedy = httpx.post(url + "/v1/completions", json=GOOD, timeout=60).json()["choices"][0]["text"]
    for t in (1e-320, 1e-30):
        resp = httpx.post(url + "/v1/completions", json={**GOOD, "temperature": t, "seed": 1}, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] == greedy, t


INTERNAL_CASES = [
    # (service kind, path, body): what a buggy or hostile internal caller might send
    ("prompt", "/prefill", {"request_id": "r1", "prompt_ids": [1, 2], "target_service_id": "t", "target_kv_address": "x",
                            "sampling": {"logprobs": 10**9}}),
    ("prompt", "/prefill", {"request_id": "r1\nFAKE LOG LINE", "prompt_ids": [1, 2], "target_service_id": "t",
                            "target_kv_address": "x", "sampling": {}}),
    ("prompt", "/prefill", {"request_id": "r1", "prompt_ids": [-1], "target_service_id": "t", "target_kv_address": "x",
                            "sampling": {}}),
    ("prompt", "/prefill", {"request_id": "r1", "prompt_ids": [1], "target_service_id": "t", "target_kv_address": "x",
                            "sampling": {"temperature": 1e308, "top_p": 0}}),
    ("token", "/reserve", {"request_id": "r1", "prompt_tokens": 10**12, "max_tokens": 1}),
    ("token", "/decode", {"request_id": "r1", "replay": [1], "first_token": 1, "first_index": -4,
                          "sampling": {"max_tokens": 8}}),
    ("token", "/restore", {"request_id": "r1", "epoch": -1, "prompt_ids": [1], "replicated": 1, "store_id": "s",
                           "store_kv_address": "x"}),
    ("token", "/abort", {"request_id": "../../etc"}),
    ("cache_store", "/drop", {"request_id": "r1", "epoch": -3}),
]


@pytest.mark.parametrize("kind,path,body", INTERNAL_CASES, ids=[f"{c[0]}{c[1]}-{i}" for i, c in enumerate(INTERNAL_CASES)])
def test_internal_endpoints_validate_what_they_are_sent(tiny_cluster, kind, path, body):
    """Issue #10 item 12: every internal boundary validates, as the gateway does at the public one."""
    svc = tiny_cluster.of(kind)[0]
    assert_openai_error(httpx.post(svc.url + path, json=body, headers=tiny_cluster.internal_headers, timeout=30), 400, None)
    assert httpx.get(svc.url + "/health", timeout=10).json()["status"] == "ok"


def test_internal_bodies_are_bounded(tiny_cluster, url):
    for svc in (tiny_cluster.of("prompt")[0], tiny_cluster.of("token")[0]):
        resp = httpx.post(svc.url + "/reserve", content=b"[" + b"1," * (33 << 20) + b"1]", timeout=60,
                          headers={"content-type": "application/json", **tiny_cluster.internal_headers})
        assert resp.status_code == 413, resp.text
    resp = httpx.post(url + "/v1/completions", json=GOOD, timeout=60)
    assert resp.status_code == 200, resp.text


def test_a_field_of_the_wrong_type_is_named_as_the_client_sent_it(url):
    """Not as pydantic's union member ('temperature.float': a probe's find), on completions and in a chat's messages."""
    resp = httpx.post(url + "/v1/completions", json={**GOOD, "temperature": "1"}, timeout=30)
    assert_openai_error(resp, 400, "temperature")
    assert resp.json()["error"]["message"].startswith("'temperature': "), resp.json()
    resp = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": 5}], "max_tokens": 2},
                      timeout=30)
    assert_openai_error(resp, 400, "messages")
    assert resp.json()["error"]["message"].startswith("'messages.0"), resp.json()
    assert "str" not in resp.json()["error"]["message"].split(":")[0], resp.json()
    resp = httpx.post(url + "/v1/completions", json={**GOOD, "logit_bias": {"none": "x"}}, timeout=30)
    assert_openai_error(resp, 400, "logit_bias")  # a key of the client's that reads like a tag stays
    assert resp.json()["error"]["message"].startswith("'logit_bias.none'"), resp.json()
