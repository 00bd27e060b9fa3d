"""Issue #10, the proof by fuzzing of the public API, against a cluster of real processes (tiny
model, KV over TCP): schemathesis against the gateway's live OpenAPI schema, then hand-written
hostile payloads (lone surrogates, NaN and Infinity, huge numbers, JSON nested 10,000 deep, wrong
types, bytes that are not UTF-8 or not JSON). No answer is a 5xx; every refusal is a 4xx with the
OpenAI error body; afterwards the gateway is ready, a greedy request is answered as Hugging Face
`generate` answers it, no KV is held, and every process still runs.

Schemathesis runs its deterministic coverage cases (boundary values, missing and mistyped fields,
methods a route does not take) and seeded hypothesis fuzzing (schema-valid and schema-violating
bodies), with its checks, but three on which our documented behaviour differs from the schema
FastAPI writes (it knows types, not our rules):
- status_code_conformance: the schema documents 200 and 422; the gateway answers a bad request
  with OpenAI's 400 (and 404, 413, 429, 503), never 422;
- content_type_conformance: the schema says application/json for every 200; a `stream: true`
  request is answered with text/event-stream, /metrics with Prometheus text;
- positive_data_acceptance: schema-valid is not valid here: max_tokens >= 1, temperature in [0, 2],
  n = 1, no penalties, a non-empty prompt, ... are documented 400s the schema cannot express.
"""

from __future__ import annotations

import json

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from dejavu.cluster import Cluster
from tests.cluster.conftest import CLUSTER_ENV, redis_server_flush
from tests.cluster.test_bad_input import assert_openai_error
from tests.cluster.test_serving import assert_no_kv_held

# A context of 128 tokens: every request the fuzzers get served is short, so the run is too.
ENV = {**CLUSTER_ENV, "DEJAVU_KV_TRANSPORT": "tcp", "DEJAVU_MAX_MODEL_LEN": "128", "DEJAVU_MAX_TOKENS_DEFAULT": "4"}
CHECKS_OFF = ("status_code_conformance", "content_type_conformance", "positive_data_acceptance")  # see above
SEED = 20261201
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TIMEOUT_S = 60  # bound on one request; never asserted as a latency
GOOD = {"prompt": "Hello there", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def cluster(tiny_model_path, redis_server):
    with Cluster(str(tiny_model_path), port=0, cache_stores=0, redis_url=redis_server.url, env=ENV,
                 echo_logs=False) as c:
        yield c
    redis_server_flush(redis_server)


@pytest.fixture(scope="module")
def gateway_schema(cluster):
    config = schemathesis.Config.from_dict({"seed": SEED, "base-url": cluster.url, "generation": {"mode": "all"},
                                            "checks": {name: {"enabled": False} for name in CHECKS_OFF}})
    return schemathesis.openapi.from_url(cluster.url + "/openapi.json", config=config)


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def call_and_check(case, session) -> None:
    """One request; schemathesis' checks (not_a_server_error among them) raise on a failure."""
    response = case.call(session=session, timeout=TIMEOUT_S)
    assert response.status_code < 500, (case.method, case.path, case.body, response.status_code, response.text)
    case.validate_response(response)


def test_schemathesis_coverage_cases(gateway_schema, session):
    """Every operation's deterministic cases, valid and not: each field at its boundaries, with
    wrong types, missing; the methods each route does not take (a 405 with Allow)."""
    count = 0
    for operation in operations(gateway_schema):
        generation = gateway_schema.config.generation_for(operation=operation)
        for case in gateway_schema.iter_coverage_cases(operation, generation_modes=list(GenerationMode),
                                                       generation_config=generation):
            call_and_check(case, session)
            count += 1
    assert count > 100  # the cases did run: about 450 for this schema


@pytest.mark.parametrize("mode", list(GenerationMode))
def test_schemathesis_fuzzing(gateway_schema, session, mode):
    """Hypothesis-generated requests per operation, schema-valid (positive) or not (negative)."""
    for operation in operations(gateway_schema):
        if mode is GenerationMode.NEGATIVE and not operation.body:
            continue  # nothing to negate in a GET without parameters

        @FUZZ
        @given(case=operation.as_strategy(mode))
        def fuzz(case):
            call_and_check(case, session)

        fuzz()


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def completion(**fields) -> bytes:
    return json.dumps({**GOOD, **fields}).encode()


def with_raw(name: str, raw: bytes, body: dict | None = None) -> bytes:
    """A JSON body whose field `name` is `raw`, bytes json.dumps would never write."""
    return json.dumps({**(body or GOOD), name: "RAW"}).encode().replace(b'"RAW"', raw)


CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
RESPONSE = {"input": "Hi", "max_output_tokens": 2}
MESSAGE = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
GENERATE = {"text": "Hi", "sampling_params": {"max_new_tokens": 2}}
JSON = "application/json"
HOSTILE = [
    # (name, path, body, content type, status, param): each must be refused, with OpenAI's error body
    ("surrogate in model", "/v1/completions", with_raw("model", b'"\\ud800"'), JSON, 400, "model"),
    ("surrogate in prompt", "/v1/completions", with_raw("prompt", b'"a \\udfff b"'), JSON, 400, "prompt"),
    ("surrogate in a prompt list", "/v1/completions", with_raw("prompt", b'["\\ud800"]'), JSON, 400, "prompt"),
    ("surrogate in stop", "/v1/completions", with_raw("stop", b'["x", "\\udc00"]'), JSON, 400, "stop"),
    ("surrogate in user", "/v1/completions", with_raw("user", b'"\\ud800"'), JSON, 400, "user"),
    ("surrogate in an unknown key", "/v1/completions", b'{"prompt": "hi", "\\ud800": 1}', JSON, 400, None),
    ("surrogate in a message", "/v1/chat/completions",
     with_raw("messages", b'[{"role": "user", "content": "\\ud800"}]', CHAT), JSON, 400, "messages"),
    ("surrogate in a content part", "/v1/chat/completions",
     with_raw("messages", b'[{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]', CHAT), JSON, 400,
     "messages"),
    ("surrogate in a role", "/v1/chat/completions",
     with_raw("messages", b'[{"role": "\\ud800", "content": "hi"}]', CHAT), JSON, 400, "messages"),
    ("surrogate in chat stop", "/v1/chat/completions", with_raw("stop", b'"\\ud800"', CHAT), JSON, 400, "stop"),
    ("NaN temperature", "/v1/completions", with_raw("temperature", b"NaN"), JSON, 400, "temperature"),
    ("Infinity temperature", "/v1/completions", with_raw("temperature", b"Infinity"), JSON, 400, "temperature"),
    ("-Infinity temperature", "/v1/completions", with_raw("temperature", b"-Infinity"), JSON, 400, "temperature"),
    ("NaN top_p", "/v1/completions", with_raw("top_p", b"NaN"), JSON, 400, "top_p"),
    ("Infinity top_p", "/v1/completions", with_raw("top_p", b"Infinity"), JSON, 400, "top_p"),
    ("-Infinity top_p", "/v1/completions", with_raw("top_p", b"-Infinity"), JSON, 400, "top_p"),
    ("NaN max_tokens", "/v1/completions", with_raw("max_tokens", b"NaN"), JSON, 400, "max_tokens"),
    ("Infinity max_tokens", "/v1/completions", with_raw("max_tokens", b"Infinity"), JSON, 400, "max_tokens"),
    ("1e400 max_tokens", "/v1/completions", with_raw("max_tokens", b"1e400"), JSON, 400, "max_tokens"),
    ("NaN seed", "/v1/completions", with_raw("seed", b"NaN"), JSON, 400, "seed"),
    ("NaN presence_penalty", "/v1/completions", with_raw("presence_penalty", b"NaN"), JSON, 400, "presence_penalty"),
    ("NaN in logit_bias", "/v1/completions", with_raw("logit_bias", b'{"1": NaN}'), JSON, 400, "logit_bias"),
    ("Infinity chat temperature", "/v1/chat/completions", with_raw("temperature", b"Infinity", CHAT), JSON, 400,
     "temperature"),
    ("10**30 max_tokens", "/v1/completions", completion(max_tokens=10**30), JSON, 400, "max_tokens"),
    ("2**63 max_tokens", "/v1/completions", completion(max_tokens=2**63), JSON, 400, "max_tokens"),
    ("-2**63 max_tokens", "/v1/completions", completion(max_tokens=-(2**63)), JSON, 400, "max_tokens"),
    ("400-digit max_tokens", "/v1/completions", with_raw("max_tokens", b"1" + b"0" * 400), JSON, 400, "max_tokens"),
    ("10**30 seed", "/v1/completions", completion(seed=10**30), JSON, 400, "seed"),
    ("2**64 seed", "/v1/completions", completion(seed=2**64), JSON, 400, "seed"),
    ("-2**63 - 1 seed", "/v1/completions", completion(seed=-(2**63) - 1), JSON, 400, "seed"),
    ("10**30 logprobs", "/v1/completions", completion(logprobs=10**30), JSON, 400, "logprobs"),
    ("2**63 logprobs", "/v1/completions", completion(logprobs=2**63), JSON, 400, "logprobs"),
    ("-2**63 top_k", "/v1/completions", completion(top_k=-(2**63)), JSON, 400, "top_k"),
    ("10**30 temperature", "/v1/completions", completion(temperature=10**30), JSON, 400, "temperature"),
    ("10**30 chat max_completion_tokens", "/v1/chat/completions", json.dumps({**CHAT, "max_tokens": None,
     "max_completion_tokens": 10**30}).encode(), JSON, 400, "max_completion_tokens"),  # the field sent
    ("2**63 chat top_logprobs", "/v1/chat/completions", json.dumps({**CHAT, "logprobs": True,
     "top_logprobs": 2**63}).encode(), JSON, 400, "top_logprobs"),
    ("token id 2**63", "/v1/completions", completion(prompt=[1, 2**63]), JSON, 400, "prompt"),
    ("prompt nested 10,000 deep", "/v1/completions", with_raw("prompt", nested(10_000)), JSON, 400, None),
    ("objects nested 10,000 deep", "/v1/completions", with_raw("x", b'{"a":' * 10_000 + b"0" + b"}" * 10_000),
     JSON, 400, None),
    ("content nested 10,000 deep", "/v1/chat/completions",
     with_raw("messages", b'[{"role": "user", "content": ' + nested(10_000) + b"}]", CHAT), JSON, 400, None),
    ("stop nested 900 deep", "/v1/completions", with_raw("stop", nested(900)), JSON, 400, "stop"),
    ("text part nested 900 deep", "/v1/chat/completions",
     with_raw("messages", b'[{"role": "user", "content": [{"type": "text", "text": ' + nested(900) + b"}]}]", CHAT),
     JSON, 400, "messages"),
    ("a batch with an empty token list", "/v1/completions", completion(prompt=[[1, 2], []]), JSON, 400, "prompt"),
    ("prompt as lists of lists of lists", "/v1/completions", completion(prompt=[[[1, 2]], [[3]]]), JSON, 400, "prompt"),
    ("prompt as an empty list of lists", "/v1/completions", completion(prompt=[[]]), JSON, 400, "prompt"),
    ("prompt as lists of lists", "/v1/completions", completion(prompt=[[[1]]]), JSON, 400, "prompt"),
    ("prompt as a list of string lists", "/v1/completions", completion(prompt=[["a"]]), JSON, 400, "prompt"),
    ("100,000 stop strings", "/v1/completions", completion(stop=["x"] * 100_000), JSON, 400, "stop"),
    ("17 stop strings of 512 characters", "/v1/completions", completion(stop=["y" * 512] * 17), JSON, 400, "stop"),
    ("prompt as an object", "/v1/completions", completion(prompt={"text": "hi"}), JSON, 400, "prompt"),
    ("prompt as true", "/v1/completions", completion(prompt=True), JSON, 400, "prompt"),
    ("max_tokens as 4.0", "/v1/completions", completion(max_tokens=4.0), JSON, 400, "max_tokens"),
    ("max_tokens as true", "/v1/completions", completion(max_tokens=True), JSON, 400, "max_tokens"),
    ("temperature as true", "/v1/completions", completion(temperature=True), JSON, 400, "temperature"),
    ("seed as a string", "/v1/completions", completion(seed="7"), JSON, 400, "seed"),
    ("stream as 1", "/v1/completions", completion(stream=1), JSON, 400, "stream"),
    ("stream_options as a string", "/v1/completions", completion(stream=True, stream_options="yes"), JSON, 400,
     "stream_options"),
    ("echo as a string", "/v1/completions", completion(echo="true"), JSON, 400, "echo"),
    ("n as a string", "/v1/completions", completion(n="2"), JSON, 400, "n"),
    ("logit_bias as a list", "/v1/completions", completion(logit_bias=[1]), JSON, 400, "logit_bias"),
    ("model as a number", "/v1/completions", completion(model=7), JSON, 400, "model"),
    ("messages as a string", "/v1/chat/completions", json.dumps({**CHAT, "messages": "hi"}).encode(), JSON, 400,
     "messages"),
    ("messages of numbers", "/v1/chat/completions", json.dumps({**CHAT, "messages": [1, 2]}).encode(), JSON, 400,
     "messages"),
    ("a message without a role", "/v1/chat/completions", json.dumps({**CHAT, "messages": [{"content": "hi"}]}).encode(),
     JSON, 400, "messages"),
    ("content as a number", "/v1/chat/completions",
     json.dumps({**CHAT, "messages": [{"role": "user", "content": 5}]}).encode(), JSON, 400, "messages"),
    ("body as a list", "/v1/completions", b"[1, 2, 3]", JSON, 400, None),
    ("body as a string", "/v1/completions", b'"hello"', JSON, 400, None),
    ("body as null", "/v1/completions", b"null", JSON, 400, None),
    ("empty body", "/v1/completions", b"", JSON, 400, None),
    ("empty chat body", "/v1/chat/completions", b"", JSON, 400, None),
    ("invalid UTF-8", "/v1/completions", b'{"prompt": "\xff\xfe\xc3("}', JSON, 400, None),
    ("invalid UTF-8 outside strings", "/v1/completions", b'{"prompt": "hi"\x80}', JSON, 400, None),
    ("truncated JSON", "/v1/chat/completions", b'{"messages": [', JSON, 400, None),
    ("text/plain", "/v1/completions", completion(), "text/plain", 400, None),
    ("a form", "/v1/completions", b"prompt=hi&max_tokens=2", "application/x-www-form-urlencoded", 400, None),
    ("multipart", "/v1/completions", b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n--b--\r\n',
     "multipart/form-data; boundary=b", 400, None),
    # the Responses API: its fields echo back into the response, so nothing that is not JSON may pass
    ("surrogate in responses input", "/v1/responses", with_raw("input", b'"\\ud800"', RESPONSE), JSON, 400, "input"),
    ("surrogate in an input item", "/v1/responses",
     with_raw("input", b'[{"role": "user", "content": [{"type": "input_text", "text": "\\udfff"}]}]', RESPONSE), JSON,
     400, "input"),
    ("NaN responses temperature", "/v1/responses", with_raw("temperature", b"NaN", RESPONSE), JSON, 400,
     "temperature"),
    ("Infinity in a tool's schema", "/v1/responses", with_raw("tools", b'[{"type": "function", "name": "f", '
     b'"parameters": {"type": "object", "maximum": Infinity}}]', RESPONSE), JSON, 400, "tools"),
    ("NaN in metadata", "/v1/responses", with_raw("metadata", b'{"k": NaN}', RESPONSE), JSON, 400, "metadata"),
    ("input nested 10,000 deep", "/v1/responses", with_raw("input", nested(10_000), RESPONSE), JSON, 400, None),
    ("an input item nested 900 deep", "/v1/responses", with_raw("input", b"[" + b'{"role": "user", "content": '
     + nested(900) + b"}]", RESPONSE), JSON, 400, "input"),
    ("10**30 max_output_tokens", "/v1/responses", json.dumps({**RESPONSE, "max_output_tokens": 10**30}).encode(), JSON,
     400, "max_output_tokens"),
    ("input of numbers", "/v1/responses", json.dumps({**RESPONSE, "input": [1, 2]}).encode(), JSON, 400, "input"),
    ("empty responses body", "/v1/responses", b"", JSON, 400, None),
    # vLLM's /tokenize and /detokenize
    ("surrogate to tokenize", "/tokenize", with_raw("prompt", b'"\\ud800"', {}), JSON, 400, "prompt"),
    ("surrogate in tokenize's template kwargs", "/tokenize",
     with_raw("chat_template_kwargs", b'{"x": "\\udfff"}', {"messages": CHAT["messages"]}), JSON, 400,
     "chat_template_kwargs"),
    ("messages nested 10,000 deep to tokenize", "/tokenize", with_raw("messages", nested(10_000), {}), JSON, 400, None),
    ("a tool nested 900 deep to tokenize", "/tokenize", with_raw("tools", b'[{"type": "function", "function": '
     b'{"name": "f", "parameters": ' + b'{"a": ' * 900 + b"1" + b"}" * 900 + b"}}]", {"messages": CHAT["messages"]}),
     JSON, 400, None),
    ("10**30 to detokenize", "/detokenize", json.dumps({"tokens": [10**30]}).encode(), JSON, 400, "tokens"),
    ("floats to detokenize", "/detokenize", json.dumps({"tokens": [1.5]}).encode(), JSON, 400, "tokens"),
    ("empty tokenize body", "/tokenize", b"", JSON, 400, None),
    # Anthropic's Messages API (its errors are Anthropic's body, which keeps OpenAI's error fields)
    ("surrogate in a message's block", "/v1/messages", with_raw(
        "messages", b'[{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]', MESSAGE), JSON, 400,
     "messages"),
    ("NaN in a tool's input_schema", "/v1/messages", with_raw("tools", b'[{"name": "f", "input_schema": '
     b'{"type": "object", "maximum": NaN}}]', MESSAGE), JSON, 400, "tools"),
    ("messages nested 10,000 deep", "/v1/messages", with_raw("messages", nested(10_000), MESSAGE), JSON, 400, None),
    ("a tool_use input nested 960 deep", "/v1/messages", with_raw("messages", b'[{"role": "assistant", "content": '
     b'[{"type": "tool_use", "id": "t", "name": "f", "input": ' + b'{"a": ' * 960 + b"1" + b"}" * 960 + b"}]}]",
     MESSAGE), JSON, 400, None),
    ("a tool nested 960 deep to count", "/v1/messages/count_tokens", with_raw("tools", b'[{"name": "f", '
     b'"input_schema": ' + b'{"a": ' * 960 + b"1" + b"}" * 960 + b"}]", MESSAGE), JSON, 400, None),
    ("10**30 max_tokens", "/v1/messages", json.dumps({**MESSAGE, "max_tokens": 10**30}).encode(), JSON, 400,
     "max_tokens"),
    ("an image block", "/v1/messages", json.dumps({**MESSAGE, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}).encode(), JSON,
     400, "messages"),
    ("empty messages body", "/v1/messages", b"", JSON, 400, None),
    ("a tool that is a string", "/v1/messages", json.dumps({**MESSAGE, "tools": ["f"]}).encode(), JSON, 400, "tools"),
    ("a tool that is null, to count", "/v1/messages/count_tokens", json.dumps({**MESSAGE, "tools": [None]}).encode(),
     JSON, 400, "tools"),
    # SGLang's /generate
    ("surrogate in a batch's text", "/generate", with_raw("text", b'["ok", "\\ud800"]', GENERATE), JSON, 400, "text"),
    ("token id 10**30", "/generate", json.dumps({"input_ids": [1, 10**30]}).encode(), JSON, 400, "input_ids"),
    ("float token ids", "/generate", json.dumps({"input_ids": [1.5]}).encode(), JSON, 400, "input_ids"),
    ("a batch of empty id lists", "/generate", json.dumps({"input_ids": [[]]}).encode(), JSON, 400, "input_ids"),
    ("sampling_params nested 10,000 deep", "/generate", with_raw("sampling_params", nested(10_000), GENERATE), JSON,
     400, None),
    ("a json_schema nested 960 deep", "/generate", json.dumps({"text": "Hi", "sampling_params": {
        "json_schema": '{"a": ' * 960 + "1" + "}" * 960}}).encode(), JSON, 400, "sampling_params.json_schema"),
    ("max_new_tokens 10**30", "/generate", json.dumps({"text": "Hi", "sampling_params": {
        "max_new_tokens": 10**30}}).encode(), JSON, 400, "sampling_params.max_new_tokens"),
    ("NaN temperature", "/generate", with_raw("sampling_params", b'{"temperature": NaN}', GENERATE), JSON, 400, None),
    ("a logit_bias key that is no id", "/generate", json.dumps({"text": "Hi", "sampling_params": {
        "logit_bias": {"x": 1}}}).encode(), JSON, 400, "sampling_params.logit_bias"),
    ("more rids than prompts", "/generate", json.dumps({**GENERATE, "rid": ["a", "b"]}).encode(), JSON, 400, "rid"),
    ("300 prompts", "/generate", json.dumps({"text": ["Hi"] * 300}).encode(), JSON, 400, "text"),
    ("n 0", "/generate", json.dumps({"text": "Hi", "sampling_params": {"n": 0}}).encode(), JSON, 400,
     "sampling_params.n"),
    ("1000 stop strings", "/generate", json.dumps({"text": "Hi", "sampling_params": {"stop": ["x"] * 1000}}).encode(),
     JSON, 400, "sampling_params.stop"),
    ("an unknown sampling parameter", "/generate", json.dumps({"text": "Hi", "sampling_params": {"best_of": 2}}).encode(),
     JSON, 400, "sampling_params"),
]


@pytest.mark.parametrize("name,path,body,content_type,status,param", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_payloads_get_an_openai_4xx(cluster, name, path, body, content_type, status, param):
    resp = httpx.post(cluster.url + path, content=body, headers={"content-type": content_type}, timeout=TIMEOUT_S)
    assert_openai_error(resp, status, param)
    assert ("type" in resp.json()) == path.startswith("/v1/messages")  # Anthropic's {"type": "error", ...} there


EXTREMES = [
    # (name, body): at the edge of what the README documents, and served
    ("seed 2**64 - 1", completion(seed=2**64 - 1)),
    ("seed -2**63", completion(seed=-(2**63))),
    ("top_k 2**63", completion(top_k=2**63)),  # more than the vocabulary: no truncation
    ("top_k 10**30", completion(top_k=10**30)),
    ("prompt as one list of token ids", completion(prompt=[[1, 2, 3]])),
    ("a surrogate pair (one emoji)", with_raw("prompt", b'"hi \\ud83d\\ude00"')),
    ("an unknown field nested 500 deep", with_raw("x", nested(500))),
    ("temperature 1e-320", completion(temperature=1e-320)),
]


@pytest.mark.parametrize("name,body", EXTREMES, ids=[c[0] for c in EXTREMES])
def test_extreme_but_valid_values_are_served(cluster, name, body):
    resp = httpx.post(cluster.url + "/v1/completions", content=body, headers={"content-type": JSON}, timeout=TIMEOUT_S)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] >= 1


def test_a_method_a_route_does_not_take_gets_405_with_allow(cluster):
    """Found by schemathesis (unsupported_method): our error handler dropped the Allow header
    Starlette gives a 405, which RFC 9110 requires."""
    for method, path, allowed in (("DELETE", "/v1/completions", {"POST"}), ("POST", "/v1/models", {"GET"})):
        resp = httpx.request(method, cluster.url + path, timeout=TIMEOUT_S)
        assert resp.status_code == 405 and set(resp.json()["error"]) == {"message", "type", "param", "code"}, resp.text
        assert set(resp.headers["allow"].split(", ")) == allowed


def test_an_empty_body_is_named_in_the_error(cluster):
    """Found by the payloads above: an empty body was answered "'None' is required"."""
    resp = httpx.post(cluster.url + "/v1/chat/completions", content=b"", headers={"content-type": JSON},
                      timeout=TIMEOUT_S)
    assert_openai_error(resp, 400, None)
    assert resp.json()["error"]["message"] == "the body is required: a JSON object"


def test_the_cluster_is_alive_and_serving_after_all_of_it(cluster, tiny_oracle):
    """Run last (pytest keeps file order): everything above left no process dead and no KV held."""
    assert [c.name for c in cluster.children if c.proc.poll() is not None] == []
    assert httpx.get(cluster.url + "/health", timeout=TIMEOUT_S).status_code == 200
    resp = httpx.post(cluster.url + "/v1/completions", json=GOOD, timeout=TIMEOUT_S)
    assert resp.status_code == 200, resp.text
    ids = tiny_oracle.tokenizer(GOOD["prompt"])["input_ids"]
    assert resp.json()["choices"][0]["text"] == tiny_oracle.text(ids, GOOD["max_tokens"])[0]
    for child in cluster.children:
        assert httpx.get(child.url + "/health", timeout=TIMEOUT_S).status_code == 200, child.name
    assert_no_kv_held(cluster)
