"""The full disaggregated path on real processes (real Redis, real KV transport, both
transports): greedy output equals HF `generate` token for token, streamed or not, alone or
concurrent; aborts free the KV."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

from common.kv import shm
from tests.cluster.conftest import metric

PROMPTS = [
    "Hello",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a land far far away, there lived a dragon who loved " * 3,
    "Les élèves étudient la grammaire française et les mathématiques. 日本語のテキストも少し。 🚀✨",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, " * 4,
]


def completion(url: str, **body) -> dict:
    resp = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


async def stream_completion(client: httpx.AsyncClient, url: str, **body) -> tuple[list[str], dict]:
    """(text chunks, the usage chunk)."""
    chunks, usage = [], None
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200, (await resp.aread()).decode()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if event["choices"]:
                chunks.append(event["choices"][0]["text"])
            if event.get("usage"):
                usage = event["usage"]
    return chunks, usage


def test_greedy_equals_hf_generate(tiny_cluster, tiny_oracle):
    tok = tiny_oracle.tokenizer
    for i, prompt in enumerate(PROMPTS):
        max_tokens = 5 + 7 * i
        want_text, want_n = tiny_oracle.text(tok(prompt)["input_ids"], max_tokens)
        got = completion(tiny_cluster.url, prompt=prompt, max_tokens=max_tokens, temperature=0)
        assert got["choices"][0]["text"] == want_text, f"prompt {i} over {tiny_cluster.transport}"
        assert got["usage"]["completion_tokens"] == want_n
        assert got["usage"]["prompt_tokens"] == len(tok(prompt)["input_ids"])
    if not shm.SUPPORTED:
        return
    # the prompt's KV and the replicas crossed in shared memory: all of these processes are on one host
    assert metric(tiny_cluster.of("prompt")[0].url, "dejavu_kv_ring_sent_bytes_total") > 0
    assert metric(tiny_cluster.of("token")[0].url, "dejavu_kv_ring_received_bytes_total") > 0
    assert metric(tiny_cluster.of("cache_store")[0].url, "dejavu_kv_ring_received_bytes_total") > 0


def test_concurrent_streams_of_different_lengths_equal_hf(tiny_cluster, tiny_oracle):
    """More requests than a batch at once, streamed and not: continuous batching with joins and
    leaves at every step, and each one still exact."""
    tok = tiny_oracle.tokenizer
    cases = [(PROMPTS[i % len(PROMPTS)] * (1 + i % 2), 4 + (11 * i) % 40) for i in range(12)]
    want = [tiny_oracle.text(tok(p)["input_ids"], n) for p, n in cases]

    async def run():
        async with httpx.AsyncClient() as client:
            async def one(i, prompt, n):
                if i % 2:
                    chunks, usage = await stream_completion(client, tiny_cluster.url, prompt=prompt, max_tokens=n,
                                                            temperature=0)
                    return "".join(chunks), usage["completion_tokens"]
                resp = await client.post(tiny_cluster.url + "/v1/completions", timeout=120,
                                         json={"prompt": prompt, "max_tokens": n, "temperature": 0})
                assert resp.status_code == 200, resp.text
                return resp.json()["choices"][0]["text"], resp.json()["usage"]["completion_tokens"]

            return await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(cases)))

    got = asyncio.run(run())
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"request {i} over {tiny_cluster.transport}"
    assert_no_kv_held(tiny_cluster)


def test_prompt_as_token_ids_and_echo(tiny_cluster, tiny_oracle):
    ids = tiny_oracle.tokenizer("The capital of France is")["input_ids"]
    want_text, _ = tiny_oracle.text(ids, 12)
    got = completion(tiny_cluster.url, prompt=ids, max_tokens=12, temperature=0, echo=True)
    prompt_text = tiny_oracle.tokenizer.decode(ids, skip_special_tokens=True)
    assert got["choices"][0]["text"] == prompt_text + want_text


def test_a_batch_of_prompts_with_n_choices_each(tiny_cluster, tiny_oracle):
    """A list of prompts (lm-evaluation-harness's batches, the openai SDK's prompt=[...]) and n > 1:
    every choice is a request of its own downstream; the answer lists them prompt by prompt, each
    its index. Greedy: HF's text for each; seeded: choice i draws from seed + i, so the n choices
    differ and the same request gives them again. Streamed: each index's chunks make its text, one
    usage chunk for all."""
    ids = [tiny_oracle.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    want = [tiny_oracle.text(i, 8)[0] for i in ids]
    got = completion(tiny_cluster.url, prompt=ids, max_tokens=8, temperature=0, n=2)
    assert [c["index"] for c in got["choices"]] == list(range(6))
    assert [c["text"] for c in got["choices"]] == [w for w in want for _ in range(2)]
    assert got["usage"]["prompt_tokens"] == sum(map(len, ids))  # a prompt counted once, whatever n
    assert got["usage"]["completion_tokens"] == 6 * 8 or all(c["finish_reason"] for c in got["choices"])

    seeded = dict(prompt=PROMPTS[1], max_tokens=16, temperature=1.0, seed=7, n=3)
    first, again = completion(tiny_cluster.url, **seeded), completion(tiny_cluster.url, **seeded)
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in again["choices"]] and len(set(texts)) == 3
    assert texts[0] == completion(tiny_cluster.url, **{**seeded, "n": 1})["choices"][0]["text"]

    async def streamed() -> tuple[dict, dict, set]:
        chunks, usage, stream_ids = {}, None, set()
        body = {"prompt": ids[:2], "max_tokens": 8, "temperature": 0, "n": 2, "stream": True,
                "stream_options": {"include_usage": True}}
        async with httpx.AsyncClient() as client:
            async with client.stream("POST", tiny_cluster.url + "/v1/completions", json=body, timeout=120) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        data = json.loads(line[6:])
                        stream_ids.add(data["id"])
                        for c in data["choices"]:
                            chunks[c["index"]] = chunks.get(c["index"], "") + c["text"]
                        usage = data.get("usage") or usage
        return chunks, usage, stream_ids

    chunks, usage, stream_ids = asyncio.run(streamed())
    assert chunks == {i: want[i // 2] for i in range(4)}
    assert len(stream_ids) == 1, stream_ids  # one completion, one id on every chunk (as its whole answer)
    assert usage["prompt_tokens"] == len(ids[0]) + len(ids[1])
    assert_no_kv_held(tiny_cluster)


def test_stop_string_ends_request_and_frees_kv(tiny_cluster, tiny_oracle):
    ids = tiny_oracle.tokenizer(PROMPTS[3])["input_ids"]
    full, _ = tiny_oracle.text(ids, 60)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), "the oracle text should have a usable middle"
    got = completion(tiny_cluster.url, prompt=ids, max_tokens=60, temperature=0, stop=[stop])
    choice = got["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == full[: full.find(stop)]
    assert got["usage"]["completion_tokens"] < 60
    assert_no_kv_held(tiny_cluster)


def test_seeded_sampling_is_reproducible(tiny_cluster):
    body = dict(prompt="Once upon a time", max_tokens=24, temperature=0.9, top_p=0.95, top_k=50)
    a = completion(tiny_cluster.url, seed=1234, **body)["choices"][0]["text"]
    b = completion(tiny_cluster.url, seed=1234, **body)["choices"][0]["text"]
    c = completion(tiny_cluster.url, seed=4321, **body)["choices"][0]["text"]
    assert a == b
    assert a != c


def test_client_disconnect_aborts_and_frees_kv(tiny_cluster):
    """And leaves no connection open between the gateway and the token service: the decode
    stream's close, cancelled again and again as the gateway cleaned up after its client, was cut
    short, and each stream a client closed kept a socket (and a file descriptor) open on both sides
    for good (a soak of 2,429 requests: 204 of them)."""
    import psutil

    async def run():
        async with httpx.AsyncClient() as client:
            body = {"prompt": "Tell me a long story", "max_tokens": 400, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            async with client.stream("POST", tiny_cluster.url + "/v1/completions", json=body, timeout=60) as resp:
                assert resp.status_code == 200
                seen = 0
                async for line in resp.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen >= 4:
                        break  # leaving the block closes the connection mid-stream

    [token] = tiny_cluster.of("token")
    token_port = int(token.url.rsplit(":", 1)[1])

    def to_token() -> int:
        return sum(bool(c.raddr) and c.raddr.port == token_port and c.status == psutil.CONN_ESTABLISHED
                   for c in psutil.Process(tiny_cluster.gateway.proc.pid).net_connections("tcp"))

    before = to_token()
    for _ in range(6):
        asyncio.run(run())
    assert_no_kv_held(tiny_cluster)
    assert to_token() <= before + 2, "streams whose clients left kept connections to the token service open"


def test_more_requests_than_kv_rows_all_complete(tiny_cluster, tiny_oracle):
    """8 rows per token service; 14 requests at once: the gateway waits for room, none fails."""
    tok = tiny_oracle.tokenizer
    cases = [(f"Request number {i}: " + PROMPTS[1], 20) for i in range(14)]
    want = [tiny_oracle.text(tok(p)["input_ids"], n)[0] for p, n in cases]

    async def run():
        async with httpx.AsyncClient() as client:
            resps = await asyncio.gather(*(client.post(tiny_cluster.url + "/v1/completions", timeout=120,
                                                       json={"prompt": p, "max_tokens": n, "temperature": 0})
                                           for p, n in cases))
            return [r.json()["choices"][0]["text"] for r in resps]

    assert asyncio.run(run()) == want
    assert_no_kv_held(tiny_cluster)


def assert_no_kv_held(cluster, timeout: float = 15.0) -> None:
    """Invariant 3: once requests end, no KV is held and nothing is in flight anywhere."""
    deadline = time.monotonic() + timeout
    while True:
        values = {}
        for child in cluster.of("token"):
            values[child.name + " rows"] = metric(child.url, "dejavu_token_sequences")
            values[child.name + " bytes"] = metric(child.url, "dejavu_token_kv_bytes_used")
            values[child.name + " replication lag"] = metric(child.url, "dejavu_token_replication_lag_tokens")
        for child in cluster.of("prompt"):
            values[child.name + " in flight"] = metric(child.url, "dejavu_prompt_in_flight_requests")
        for child in cluster.of("cache_store"):
            values[child.name + " replica bytes"] = metric(child.url, "dejavu_cache_store_bytes_held")
            values[child.name + " spilled bytes"] = metric(child.url, "dejavu_cache_store_bytes_spilled")
        values["gateway in flight"] = metric(cluster.url, "dejavu_gateway_in_flight_requests")
        if not any(values.values()):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"KV or requests still held after {timeout:.0f} s: {values}")
        time.sleep(0.2)


def test_non_streaming_client_that_leaves_frees_everything(tiny_cluster):
    """A non-streaming client that gives up: the gateway notices, aborts downstream, counts nothing in flight.
    It gives up after 0.2 s: the tiny model, warm, decodes all 900 tokens in about 1 s (a 1 s read
    timeout, as before, saw the answer come in time)."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny_cluster.url + "/v1/completions", timeout=httpx.Timeout(10, read=0.2),
                   json={"prompt": "Tell me everything", "max_tokens": 900, "temperature": 0, "ignore_eos": True})
    assert_no_kv_held(tiny_cluster)


def test_requests_done_at_the_first_token_free_their_row(tiny_cluster):
    """max_tokens=1 ends at the prompt service's token: the reserved row must be released anyway."""
    for _ in range(3):
        got = completion(tiny_cluster.url, prompt="Hello there", max_tokens=1, temperature=0)
        assert got["choices"][0]["finish_reason"] == "length" and got["usage"]["completion_tokens"] == 1
    assert_no_kv_held(tiny_cluster, timeout=5)


def test_one_model_is_retrieved_by_its_id(tiny_cluster):
    """GET /v1/models/{id} (the openai SDK's models.retrieve): the listed model, or an OpenAI 404."""
    listed = httpx.get(tiny_cluster.url + "/v1/models", timeout=10).json()["data"][0]
    got = httpx.get(tiny_cluster.url + f"/v1/models/{listed['id']}", timeout=10)
    assert got.status_code == 200 and got.json() == listed
    # when this gateway started serving it (vLLM's; it said 0, 1970, before)
    assert time.time() - 3600 < listed["created"] <= time.time()
    assert listed["created_at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(listed["created"]))
    missing = httpx.get(tiny_cluster.url + "/v1/models/no-such-model", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found" and missing.json()["error"]["param"] == "model"


def test_answers_carry_their_request_ids_and_a_clients_own_id_is_logged_with_them(tiny_cluster):
    """x-request-id (and Anthropic's request-id) on every answer, whole or streamed, one id a choice,
    a refusal too: the ids the logs carry (and the openai SDK's `_request_id`); a client's
    X-Request-Id is written to the gateway's log beside ours, and never becomes ours."""
    import openai

    url = tiny_cluster.url
    whole = httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2},
                       headers={"X-Request-Id": "trace-7f3a"}, timeout=60)
    rid = whole.json()["id"].removeprefix("cmpl-")
    assert whole.headers["x-request-id"] == whole.headers["request-id"] == rid != "trace-7f3a"
    gateway = tiny_cluster.of("gateway")[0]
    deadline = time.monotonic() + 10
    while not any("trace-7f3a" in line and rid in line for line in gateway.tail) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any("trace-7f3a" in line and rid in line for line in gateway.tail), list(gateway.tail)

    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as resp:
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
        assert resp.headers["x-request-id"] == chunks[0]["id"].removeprefix("chatcmpl-")
    two = httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 1, "n": 2}, timeout=60)
    ids = two.headers["x-request-id"].split(", ")
    assert len(set(ids)) == 2 and two.json()["id"].removeprefix("cmpl-") == ids[0]
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPTS[0], max_tokens=1)
    assert out._request_id == out.id.removeprefix("cmpl-")
    refused = httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 10**6},
                         headers={"X-Request-Id": "trace-9b1c"}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
    rid = refused.headers["x-request-id"]  # refused before it was served: an id all the same, and a log line
    while not any(rid in line and "trace-9b1c" in line and "max_tokens" in line for line in gateway.tail):
        assert time.monotonic() < deadline + 10, list(gateway.tail)
        time.sleep(0.1)
    assert_no_kv_held(tiny_cluster)


def penalized_cases(tiny_oracle) -> list[tuple[dict, list[int]]]:
    """(request fields, the token ids Hugging Face gives) for greedy requests with penalties, a
    logit bias and min_tokens. `generate` has the repetition penalty, single-token sequence biases
    and min_new_tokens; OpenAI's frequency and presence penalties come from the model's logits by
    their formula (Oracle.penalized_ids)."""
    prompt = tiny_oracle.tokenizer(PROMPTS[1])["input_ids"]
    plain = tiny_oracle.generate_ids(prompt, 24)
    favoured = plain[3]  # a token it gives anyway, pushed further
    cases = [
        ({"max_tokens": 24, "repetition_penalty": 1.5, "logit_bias": {str(favoured): 4}},
         tiny_oracle.generate_ids(prompt, 24, repetition_penalty=1.5, sequence_bias={(favoured,): 4.0})),
        # EOS pushed to the top, held back for 5 tokens: the sixth ends it
        ({"max_tokens": 20, "logit_bias": {"2": 100}, "min_tokens": 5},
         tiny_oracle.generate_ids(prompt, 20, sequence_bias={(2,): 100.0}, min_new_tokens=5)),
        ({"max_tokens": 24, "frequency_penalty": 1.5, "presence_penalty": 0.5},
         tiny_oracle.penalized_ids(prompt, 24, 1.5, 0.5)),
    ]
    for _, want in cases:
        assert want != plain  # each changes what greedy gives, so the test would see it ignored
    assert cases[1][1][5:] == [2] and 2 not in cases[1][1][:5]
    return [({**fields, "prompt": prompt, "temperature": 0}, want) for fields, want in cases]


def test_penalties_logit_bias_and_min_tokens_equal_hf(tiny_cluster, tiny_oracle):
    for body, want in penalized_cases(tiny_oracle):
        got = completion(tiny_cluster.url, **body)["choices"][0]
        assert got["text"] == tiny_oracle.tokenizer.decode(want, skip_special_tokens=True), body
        assert got["finish_reason"] == ("stop" if want[-1] == 2 else "length"), body
    assert_no_kv_held(tiny_cluster)


def test_stop_token_ids_end_the_text_before_the_token_unless_asked_to_keep_it(tiny_cluster, tiny_oracle):
    prompt = tiny_oracle.tokenizer(PROMPTS[2])["input_ids"]
    want = tiny_oracle.generate_ids(prompt, 12)
    stop = next(t for t in want[3:] if t not in want[:3])  # a token it gives, not among the first three
    at = want.index(stop)
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "stop_token_ids": [stop], "ignore_eos": True}
    for include in (False, True):
        got = completion(tiny_cluster.url, **body, include_stop_str_in_output=include, logprobs=0)
        choice = got["choices"][0]
        assert choice["text"] == tiny_oracle.tokenizer.decode(want[: at + include], skip_special_tokens=True)
        assert choice["finish_reason"] == "stop" and got["usage"]["completion_tokens"] == at + 1
        assert len(choice["logprobs"]["tokens"]) == at + 1  # the stop token is scored, as vLLM's


def test_structured_output_follows_its_grammar_streamed_or_not(tiny_cluster):
    """A random tiny model, sampled at temperature 1, writes what the grammar allows and ends where
    it is complete ("stop", no EOS needed): a JSON document of the schema, a regex, one of a choice.
    The same seed gives the same text streamed or not; a grammar that does not compile is a 400."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                               "ok": {"type": "boolean"}, "tag": {"enum": ["red", "green"]}},
              "required": ["n", "ok", "tag"], "additionalProperties": False}
    body = {"prompt": "Answer:", "max_tokens": 40, "temperature": 1.0, "seed": 11}
    # a random model, free to put any whitespace between JSON tokens, puts it forever: bounded here
    asks = [({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
              "guided_whitespace_pattern": " ?"}, None),
            ({"structured_outputs": {"json": schema, "disable_any_whitespace": True}}, None),
            ({"guided_regex": "[0-9]{2}-[a-z]{2,4}"}, r"[0-9]{2}-[a-z]{2,4}"),
            ({"guided_choice": ["alpha", "beta", "gamma"]}, "alpha|beta|gamma")]

    async def streamed(ask):
        async with httpx.AsyncClient() as client:
            return "".join((await stream_completion(client, tiny_cluster.url, **body, **ask))[0])

    for ask, regex in asks:
        choice = completion(tiny_cluster.url, **body, **ask)["choices"][0]
        text = choice["text"]
        assert choice["finish_reason"] == "stop", (ask, text)
        if regex is None:
            doc = json.loads(text)
            assert set(doc) == {"n", "ok", "tag"} and 0 <= doc["n"] <= 999 and doc["tag"] in ("red", "green"), text
            assert isinstance(doc["ok"], bool)
            assert "  " not in text and "\n" not in text, text
            if "structured_outputs" in ask:
                assert " " not in text, text  # disable_any_whitespace
        else:
            assert re.fullmatch(regex, text), (ask, text)
        assert asyncio.run(streamed(ask)) == text, ask
    resp = httpx.post(tiny_cluster.url + "/v1/completions", json={**body, "guided_regex": "[0-9"}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "guided_regex", resp.text
    # a schema that allows no output; a regex that compiles, then fails on its first token (past
    # llguidance's limits): a 400, never a "stop" with text that breaks the grammar
    for ask in ({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {"$ref": "#"}}}},
                {"guided_regex": "a{1000000}"}):
        for stream in (False, True):
            resp = httpx.post(tiny_cluster.url + "/v1/completions", json={**body, **ask, "stream": stream}, timeout=60)
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_grammar", resp.text
    assert completion(tiny_cluster.url, **body, guided_regex="a{5}")["choices"][0]["text"] == "aaaaa"
    assert_no_kv_held(tiny_cluster)


def test_forced_tool_calls_follow_the_tools_schemas_streamed_or_not(tiny_cluster):
    """tool_choice 'required' and a named function: a random tiny model, sampled, calls the tools
    with arguments of their schemas; the chunks of a stream add up to the whole answer's calls
    (same seed); 'auto' without a tool-call parser (this model's template has none) is a 400."""
    def params(props: dict) -> dict:
        return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}

    fns = [{"type": "function", "function": {"name": "add", "parameters": params(
               {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0,
                                                                            "maximum": 99}})}},
           {"type": "function", "function": {"name": "light", "parameters": params({"on": {"type": "boolean"}})}}]
    body = {"messages": [{"role": "user", "content": "Add 2 and 3."}], "tools": fns, "max_tokens": 80,
            "temperature": 1.0, "seed": 5, "structured_outputs": {"disable_any_whitespace": True}}

    def check(call: dict) -> None:
        args = json.loads(call["function"]["arguments"])
        if call["function"]["name"] == "add":
            assert set(args) == {"a", "b"} and all(0 <= v <= 99 for v in args.values()), call
        else:
            assert call["function"]["name"] == "light" and isinstance(args.get("on"), bool), call

    async def streamed(ask: dict) -> tuple[str, list[dict], str]:
        content, calls, finish = "", {}, None
        async with httpx.AsyncClient() as client:
            async with client.stream("POST", tiny_cluster.url + "/v1/chat/completions", timeout=120,
                                     json={**body, **ask, "stream": True}) as resp:
                assert resp.status_code == 200, (await resp.aread()).decode()
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choice = json.loads(line[6:])["choices"][0]
                    content += choice["delta"].get("content") or ""
                    for d in choice["delta"].get("tool_calls", []):
                        if "id" in d:
                            calls[d["index"]] = {"name": d["function"]["name"], "arguments": ""}
                        calls[d["index"]]["arguments"] += d["function"]["arguments"]
                    finish = choice["finish_reason"] or finish
        return content, [calls[i] for i in sorted(calls)], finish

    # a random model never ends an array on its own: one call, parallel_tool_calls false
    for ask, finish in (({"tool_choice": "required", "parallel_tool_calls": False}, "tool_calls"),
                        ({"tool_choice": {"type": "function", "function": {"name": "add"}}}, "stop")):
        resp = httpx.post(tiny_cluster.url + "/v1/chat/completions", json={**body, **ask}, timeout=120)
        assert resp.status_code == 200, resp.text
        choice = resp.json()["choices"][0]
        calls = choice["message"].get("tool_calls")
        assert choice["finish_reason"] == finish and calls and choice["message"]["content"] is None, choice
        for call in calls:
            check(call)
            assert call["type"] == "function" and call["id"].startswith("call_")
        if "function" in str(ask):
            assert [c["function"]["name"] for c in calls] == ["add"]
        assert asyncio.run(streamed(ask)) == ("", [c["function"] for c in calls], finish), ask
    resp = httpx.post(tiny_cluster.url + "/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "tool_choice", resp.text
    assert_no_kv_held(tiny_cluster)


def test_prompts_sharing_a_prefix_reuse_its_kv_and_still_equal_hf(tiny_cluster, tiny_oracle):
    """The second turn of a chat: its prompt starts with the first's (system prompt, question,
    answer), and the prompt service computes only the rest, from the KV it kept of the first
    prefill (prefix cache); greedy output still equals HF generate, streamed or not."""
    tok = tiny_oracle.tokenizer
    system = "You are a helpful assistant who answers in French. " * 12
    first = tok(system + "What is the capital of Italy?")["input_ids"]
    url = tiny_cluster.of("prompt")[0].url
    hits = metric(url, "dejavu_prompt_prefix_cache_hits_total")
    want, _ = tiny_oracle.text(first, 12)
    assert completion(tiny_cluster.url, prompt=first, max_tokens=12, temperature=0)["choices"][0]["text"] == want
    second = first + tok(want + " And of Spain?", add_special_tokens=False)["input_ids"]
    want, _ = tiny_oracle.text(second, 12)
    got = completion(tiny_cluster.url, prompt=second, max_tokens=12, temperature=0)["choices"][0]["text"]
    assert got == want
    reused = metric(url, "dejavu_prompt_prefix_cache_hits_total") - hits
    assert reused >= len(first) - 16, (reused, len(first))  # every whole block of the first prompt (16 a block)

    async def streamed():
        async with httpx.AsyncClient() as client:
            return "".join((await stream_completion(client, tiny_cluster.url, prompt=second, max_tokens=12,
                                                    temperature=0))[0])

    assert asyncio.run(streamed()) == want
    # the second prompt again: all its whole blocks but those in its last 2 tokens (MIN_COMPUTED)
    assert metric(url, "dejavu_prompt_prefix_cache_hits_total") - hits == reused + (len(second) - 2) // 16 * 16
    assert_no_kv_held(tiny_cluster)


def test_the_responses_api_answers_as_chat_does_through_the_openai_sdk(tiny_cluster, tiny_oracle):
    """POST /v1/responses (the openai SDK's `responses`): greedy, its output_text is the chat
    answer to the same conversation, which equals HF generate on the chat template's prompt;
    streamed (the SDK's stream helper, which checks the events' order) the same, with the same
    usage."""
    import openai

    tok = tiny_oracle.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want, n = tiny_oracle.text(ids, 16)
    client = openai.OpenAI(base_url=tiny_cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    assert chat.choices[0].message.content == want
    whole = client.responses.create(model=model, instructions="Be brief.", input="Name three colours.",
                                    max_output_tokens=16, temperature=0)
    assert whole.output_text == want and whole.id.startswith("resp_") and whole.object == "response"
    assert (whole.usage.input_tokens, whole.usage.output_tokens) == (len(ids), n)
    assert whole.status == ("incomplete" if n == 16 else "completed")
    with client.responses.stream(model=model, instructions="Be brief.", max_output_tokens=16, temperature=0,
                                 input=[{"role": "user", "content": [{"type": "input_text",
                                                                      "text": "Name three colours."}]}]) as stream:
        events = list(stream)
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want
    last = events[-1]  # what the SDK's stream helper made of the last event: the response, whole
    assert last.type == ("response.incomplete" if n == 16 else "response.completed")
    assert last.response.output_text == want and last.response.usage.output_tokens == n
    with pytest.raises(openai.NotFoundError) as err:  # never stored
        client.responses.create(model=model, input="Hi", previous_response_id="resp_123")
    assert err.value.body["param"] == "previous_response_id"
    assert_no_kv_held(tiny_cluster)


def test_a_stored_response_is_continued_retrieved_listed_and_deleted_through_the_openai_sdk(tiny_cluster, tiny_oracle):
    """OpenAI's store, in Redis: a response goes on from another (previous_response_id) as the chat
    of the whole conversation (HF generate on its template's prompt), its instructions not carried
    over; streamed, the response is kept before response.completed reaches the client, so the
    next request finds it at once; retrieve, input_items and delete as the SDK calls them;
    store: false keeps nothing."""
    import openai

    tok = tiny_oracle.tokenizer
    client = openai.OpenAI(base_url=tiny_cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    first = client.responses.create(model=model, instructions="Be brief.", input="My name is Ada. Say hi.",
                                     max_output_tokens=8, temperature=0)
    assert first.store is True
    messages = [{"role": "user", "content": "My name is Ada. Say hi."},
                {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "What is my name?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want, n = tiny_oracle.text(ids, 8)
    second = client.responses.create(model=model, previous_response_id=first.id, input="What is my name?",
                                     max_output_tokens=8, temperature=0)
    assert second.output_text == want and second.previous_response_id == first.id
    assert (second.usage.input_tokens, second.usage.output_tokens) == (len(ids), n)

    with client.responses.stream(model=model, previous_response_id=second.id, input="And again?",
                                 max_output_tokens=4, temperature=0) as stream:
        streamed = list(stream)[-1].response  # response.completed, or .incomplete at the limit
    third = client.responses.create(model=model, previous_response_id=streamed.id, input="Bye.", max_output_tokens=2)
    assert client.responses.retrieve(streamed.id).output_text == streamed.output_text
    kept = client.responses.retrieve(first.id)
    assert kept.model_dump() == first.model_dump()
    [asked] = client.responses.input_items.list(second.id).data  # this turn's input only, as OpenAI's
    assert (asked.type, asked.role, asked.content[0].text) == ("message", "user", "What is my name?")
    assert asked.id.startswith("msg_")
    assert third.usage.input_tokens > second.usage.input_tokens

    unkept = client.responses.create(model=model, input="Hi", max_output_tokens=2, store=False)
    assert unkept.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=model, previous_response_id=first.id, input="Hi", max_output_tokens=2)
    assert err.value.body["param"] == "previous_response_id"
    assert client.responses.retrieve(second.id).previous_response_id == first.id  # the others stay
    assert_no_kv_held(tiny_cluster)


def test_anthropics_messages_api_answers_as_chat_does_through_the_anthropic_sdk(tiny_cluster, tiny_oracle):
    """POST /v1/messages (the anthropic SDK's `messages`): greedy, its text is the chat answer to
    the same conversation, which equals HF generate on the chat template's prompt; streamed (the
    SDK's stream helper) the same, with the same usage; count_tokens counts that prompt; a prefill
    (a final assistant turn) is continued; errors are Anthropic's body, which the SDK raises."""
    import anthropic

    tok = tiny_oracle.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want, n = tiny_oracle.text(ids, 16)
    client = anthropic.Anthropic(base_url=tiny_cluster.url, api_key="unused", max_retries=0, timeout=120)
    [listed] = client.models.list().data  # the OpenAI list, read by the anthropic SDK
    model = listed.id
    assert listed.type == "model" and listed.display_name == model
    greedy = {"temperature": 0}  # the SDK no longer names it: a field of the body all the same
    ask = dict(model=model, system="Be brief.", max_tokens=16, extra_body=greedy,
               messages=[{"role": "user", "content": "Name three colours."}])
    whole = client.messages.create(**ask)
    assert whole.content[0].text == want and whole.id.startswith("msg_") and whole.type == "message"
    assert whole._request_id == whole.id.removeprefix("msg_")  # the request-id header, which the logs carry
    assert (whole.usage.input_tokens + whole.usage.cache_read_input_tokens, whole.usage.output_tokens) == (len(ids), n)
    assert whole.stop_reason == ("max_tokens" if n == 16 else "end_turn")
    with client.messages.stream(**ask) as stream:
        said = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert said == want and final.content[0].text == want and final.usage.output_tokens == n
    assert client.messages.count_tokens(model=model, system="Be brief.",
                                        messages=ask["messages"]).input_tokens == len(ids)

    prefill = [{"role": "user", "content": "Name three colours."}, {"role": "assistant", "content": "Red,"}]
    continued = tok.apply_chat_template(prefill, continue_final_message=True, tokenize=True)
    continued = list(continued["input_ids"] if hasattr(continued, "keys") else continued)
    got = client.messages.create(model=model, max_tokens=8, extra_body=greedy, messages=prefill)
    assert got.content[0].text == tiny_oracle.text(continued, 8)[0]

    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model=model, max_tokens=0, messages=ask["messages"])
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "invalid_request_error"
    assert err.value.body["error"]["param"] == "max_tokens"
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=ask["messages"])
    assert err.value.body["error"]["type"] == "not_found_error"
    missing = httpx.post(tiny_cluster.url + "/v1/messages", json={"messages": ask["messages"]}, timeout=30)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "max_tokens"
    assert_no_kv_held(tiny_cluster)


def test_prompt_logprobs_score_the_prompt_as_hf_with_ranks_beside_echos(tiny_cluster, tiny_oracle):
    """vLLM's prompt_logprobs: null for the first prompt token, then each token's logprob and rank
    and the k likeliest there, as HF's log-softmax over the prompt says; asked with echo's logprobs
    (fewer alternatives) and n = 2, each shows its own count, every choice the same scores; on chat
    the body has them; streamed, a 400 (as vLLM's)."""
    import torch

    tok = tiny_oracle.tokenizer
    ids = tok(PROMPTS[2])["input_ids"]
    with torch.inference_mode():
        want = torch.log_softmax(tiny_oracle.model(torch.tensor([ids])).logits[0].float(), dim=-1)

    def check(scores: list, prompt: list[int], k: int) -> None:
        assert len(scores) == len(prompt) and scores[0] is None
        for at, (token, entry) in enumerate(zip(prompt[1:], scores[1:])):
            row = want[at] if prompt is ids else chat_want[at]
            mine = entry[str(token)]
            assert mine["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
            assert mine["rank"] == int((row >= row[token]).sum()) or abs(
                float(row.sort(descending=True).values[mine["rank"] - 1] - row[token])) < 1e-4  # a near tie
            assert mine["decoded_token"] == tok.convert_tokens_to_string([tok.convert_ids_to_tokens(token)])
            top = sorted(((v["rank"], int(t)) for t, v in entry.items() if not (int(t) == token and v["rank"] > k)))
            assert [r for r, _ in top] == list(range(1, k + 1))
            assert [t for _, t in top] == row.topk(k).indices.tolist() or len(set(row.topk(k + 1).values.tolist())) < k + 1

    chat_want = None
    out = completion(tiny_cluster.url, prompt=ids, max_tokens=2, temperature=0, n=2, echo=True, logprobs=1,
                     prompt_logprobs=3)
    for choice in out["choices"]:
        check(choice["prompt_logprobs"], ids, 3)
        lp = choice["logprobs"]  # echo's 1 likeliest, and each prompt token's own, first
        assert lp["top_logprobs"][0] is None
        for top, token, logprob in zip(lp["top_logprobs"][1:len(ids)], lp["tokens"][1:], lp["token_logprobs"][1:]):
            assert len(top) in (1, 2) and next(iter(top.items())) == (token, logprob)
    assert out["choices"][0]["prompt_logprobs"] == out["choices"][1]["prompt_logprobs"]
    plain = completion(tiny_cluster.url, prompt=ids, max_tokens=2, temperature=0)
    assert "prompt_logprobs" not in plain["choices"][0] and plain["choices"][0]["logprobs"] is None

    messages = [{"role": "user", "content": PROMPTS[2]}]
    chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    with torch.inference_mode():
        chat_want = torch.log_softmax(tiny_oracle.model(torch.tensor([chat_ids])).logits[0].float(), dim=-1)
    chat = httpx.post(tiny_cluster.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2,
                                                                       "prompt_logprobs": 0}, timeout=60).json()
    check(chat["prompt_logprobs"], chat_ids, 0)
    for bad in ({"prompt_logprobs": 21}, {"prompt_logprobs": -1}, {"prompt_logprobs": 2, "stream": True}):
        resp = httpx.post(tiny_cluster.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, **bad},
                          timeout=30)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt_logprobs", resp.text
    assert_no_kv_held(tiny_cluster)


def test_sglangs_generate_answers_as_hf_generate_whole_streamed_and_batched(tiny_cluster, tiny_oracle):
    """SGLang's native POST /generate: greedy, text and output_ids are HF generate's (output_ids
    keep an EOS); streamed, every event holds the answer so far and the last is the whole answer;
    a batch with n = 2 is a list, prompt by prompt; logprobs are HF's log-softmax, the output's and
    the prompt's from logprob_start_len; a bad request is a 400 in SGLang's names; SGLang's
    helper routes answer."""
    import torch

    url, tok = tiny_cluster.url, tiny_oracle.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    want = [tiny_oracle.generate_ids(p, 12) for p in ids]
    greedy = {"max_new_tokens": 12, "temperature": 0}

    one = httpx.post(url + "/generate", json={"text": PROMPTS[0], "sampling_params": greedy, "rid": "mine"},
                     timeout=120)
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["output_ids"] == want[0] and body["text"] == tok.decode(want[0], skip_special_tokens=True)
    meta = body["meta_info"]
    assert meta["id"] == "mine" and meta["prompt_tokens"] == len(ids[0]) and meta["completion_tokens"] == len(want[0])
    eos = tiny_oracle.model.generation_config.eos_token_id
    assert meta["finish_reason"] == ({"type": "stop", "matched": eos} if want[0][-1] == eos else
                                     {"type": "length", "length": 12})
    assert one.headers["x-request-id"] != "mine"  # ours, which the logs carry

    with httpx.stream("POST", url + "/generate", json={"input_ids": ids[1], "sampling_params": greedy,
                                                       "stream": True}, timeout=120) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert [e["meta_info"]["completion_tokens"] for e in events] == list(range(1, len(want[1]) + 1))
    assert all(want[1][:len(e["output_ids"])] == e["output_ids"] for e in events)
    assert events[-1]["output_ids"] == want[1] and events[-1]["text"] == tok.decode(want[1], skip_special_tokens=True)
    assert events[-1]["meta_info"]["finish_reason"] is not None and "index" not in events[-1]

    batch = httpx.post(url + "/generate", json={"input_ids": ids[1:], "sampling_params": {**greedy, "n": 2}},
                       timeout=120).json()
    assert [b["output_ids"] for b in batch] == [want[1], want[1], want[2], want[2]]
    with httpx.stream("POST", url + "/generate", json={"input_ids": ids[1:], "sampling_params": {**greedy, "n": 2},
                                                       "stream": True}, timeout=120) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    last = {e["index"]: e for e in events}  # each answer's events by its index, the last holding it whole
    assert sorted(last) == [0, 1, 2, 3] and [last[i]["output_ids"] for i in range(4)] == [b["output_ids"] for b in batch]
    shared = httpx.post(url + "/generate", json={"input_ids": ids[2], "return_logprob": True, "logprob_start_len": 0,
                                                 "sampling_params": {"max_new_tokens": 0, "n": 2}}, timeout=120).json()
    assert [s["output_ids"] for s in shared] == [[], []] and len(shared[0]["meta_info"]["input_token_logprobs"]) == len(
        ids[2]) and shared[0]["meta_info"]["input_token_logprobs"] == shared[1]["meta_info"]["input_token_logprobs"]

    scored = httpx.post(url + "/generate", json={
        "input_ids": ids[2], "sampling_params": {"max_new_tokens": 3, "temperature": 0}, "return_logprob": True,
        "top_logprobs_num": 2, "logprob_start_len": 1}, timeout=120).json()["meta_info"]
    with torch.inference_mode():
        full = ids[2] + want[2][:3]
        rows = torch.log_softmax(tiny_oracle.model(torch.tensor([full])).logits[0].float(), dim=-1)
    for at, (lp, token, text) in enumerate(scored["output_token_logprobs"]):
        assert token == want[2][at] and text is None
        assert lp == pytest.approx(float(rows[len(ids[2]) - 1 + at, token]), abs=1e-4)
    assert [t for _, t, _ in scored["output_top_logprobs"][0]] == rows[len(ids[2]) - 1].topk(2).indices.tolist()
    assert [t for _, t, _ in scored["input_token_logprobs"]] == ids[2][1:]
    assert scored["input_token_logprobs"][0][0] is None  # the first from logprob_start_len: null, as SGLang's
    for at, (lp, token, _) in enumerate(scored["input_token_logprobs"][1:], 2):
        assert lp == pytest.approx(float(rows[at - 1, token]), abs=1e-4)

    bad = httpx.post(url + "/generate", json={"text": "Hi", "sampling_params": {"seed": 1}}, timeout=30)
    assert bad.status_code == 400 and "sampling_seed" in bad.json()["error"]["message"]
    long = httpx.post(url + "/generate", json={"input_ids": [5] * 5000}, timeout=30)
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    info = httpx.get(url + "/model_info", timeout=30).json()
    assert info["is_generation"] and info["tokenizer_path"] == info["model_path"]
    assert httpx.get(url + "/get_server_info", timeout=30).json()["internal_states"] == [{}]
    assert httpx.get(url + "/health_generate", timeout=60).status_code == 200
    assert_no_kv_held(tiny_cluster)


def test_sglangs_abort_request_ends_generate_requests_with_what_they_have(tiny_cluster):
    """SGLang's POST /abort_request: the stream whose rid is named ends with its output so far
    and finish_reason abort (another's prefix of it ends nothing); abort_all ends a whole answer being waited for, which
    comes back 200 with what it has; /v1/loads counts them in flight, then none; no KV is held."""
    from concurrent.futures import ThreadPoolExecutor

    url = tiny_cluster.url
    endless = {"max_new_tokens": None, "ignore_eos": True, "temperature": 0}  # to the end of the context

    def loads() -> int:
        [load] = httpx.get(url + "/v1/loads", timeout=30).json()["loads"]
        return load["num_running_reqs"] + load["num_waiting_reqs"]

    with ThreadPoolExecutor(1) as pool:
        whole = pool.submit(httpx.post, url + "/generate", json={"text": "Tell me", "rid": "other",
                                                                 "sampling_params": endless}, timeout=120)
        deadline = time.monotonic() + 60
        while loads() < 1 and time.monotonic() < deadline:  # it has started before the stream opens
            time.sleep(0.05)
        events = []
        with httpx.stream("POST", url + "/generate", json={"text": "Count", "rid": "job-1", "stream": True,
                                                           "sampling_params": endless}, timeout=120) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    if len(events) == 5:
                        assert loads() == 2
                        assert httpx.post(url + "/abort_request", json={"rid": "job"}, timeout=30).status_code == 200
                        time.sleep(0.3)
                        assert loads() == 2  # a prefix of the rid is not the rid: it ended nothing
                        assert httpx.post(url + "/abort_request", json={"rid": "job-1"}, timeout=30).status_code == 200
        assert events[-1]["meta_info"]["finish_reason"]["type"] == "abort" and events[-1]["meta_info"]["id"] == "job-1"
        assert len(events[-1]["output_ids"]) >= 5
        assert all(e["output_ids"] == events[-1]["output_ids"][:len(e["output_ids"])] for e in events)
        assert httpx.post(url + "/abort_request", json={"abort_all": True}, timeout=30).status_code == 200
        answer = whole.result()
    assert answer.status_code == 200 and answer.json()["meta_info"]["finish_reason"]["type"] == "abort"
    assert answer.json()["meta_info"]["id"] == "other"
    assert loads() == 0
    assert_no_kv_held(tiny_cluster)


def test_tokenize_gives_the_ids_a_completion_or_chat_is_prefilled_with(tiny_cluster, tiny_oracle):
    """vLLM's /tokenize and /detokenize: a prompt's ids are the ones /v1/completions counts (and,
    sent back as the prompt, answer the same); a chat's are the template's, as the chat's usage
    counts them; ids detokenize to their text; bad input is an OpenAI 4xx naming the field."""
    url, tok = tiny_cluster.url, tiny_oracle.tokenizer
    prompt = PROMPTS[4]
    got = httpx.post(url + "/tokenize", json={"prompt": prompt, "return_token_strs": True}, timeout=30)
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["tokens"] == tok(prompt)["input_ids"] and body["count"] == len(body["tokens"])
    assert body["token_strs"] == tok.convert_ids_to_tokens(body["tokens"]) and body["max_model_len"] > body["count"]
    by_text = completion(url, prompt=prompt, max_tokens=6, temperature=0)
    by_ids = completion(url, prompt=body["tokens"], max_tokens=6, temperature=0)
    assert by_text["usage"]["prompt_tokens"] == body["count"]
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    chat = httpx.post(url + "/tokenize", json={"messages": messages}, timeout=30).json()
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert chat["tokens"] == list(want["input_ids"] if hasattr(want, "keys") else want) and chat["token_strs"] is None
    answered = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2}, timeout=60)
    assert answered.json()["usage"]["prompt_tokens"] == chat["count"]

    text = httpx.post(url + "/detokenize", json={"tokens": body["tokens"]}, timeout=30).json()
    assert text == {"prompt": tok.decode(body["tokens"])}
    version = httpx.get(url + "/version", timeout=10).json()
    assert isinstance(version["version"], str) and version["version"]

    for path, bad, param, status in (
            ("/tokenize", {}, None, 400),
            ("/tokenize", {"prompt": "a", "messages": messages}, "prompt", 400),
            ("/tokenize", {"prompt": 5}, "prompt", 400),
            ("/tokenize", {"prompt": "\ud800"}, "prompt", 400),
            ("/tokenize", {"messages": [{"role": "robot", "content": "hi"}]}, "messages", 400),
            ("/tokenize", {"messages": messages, "continue_final_message": True}, "continue_final_message", 400),
            ("/tokenize", {"prompt": "a", "model": "no-such-model"}, "model", 404),
            ("/detokenize", {"tokens": [1, -1]}, "tokens", 400),
            ("/detokenize", {"tokens": [10 ** 30]}, "tokens", 400),
            ("/detokenize", {"tokens": "12"}, "tokens", 400)):
        resp = httpx.post(url + path, content=json.dumps(bad), headers={"content-type": "application/json"}, timeout=30)
        assert resp.status_code == status, (path, bad, resp.text)
        error = resp.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"} and error["message"], error
        if param:
            assert error["param"] == param, (bad, error)


def test_the_gateway_serves_without_torch(tiny_cluster):
    """The gateway's tokenizer and chat templates come from transformers without torch (gateway/__main__.py):
    a start 2.7 s shorter and ~250 MB less memory. Last in this file: after every kind of request above
    (grammars, tools, logprobs, every API), torch is still not loaded."""
    gateway = tiny_cluster.gateway
    maps = open(f"/proc/{gateway.pid}/maps").read()
    assert "libtorch" not in maps, "the gateway process has loaded torch"
    assert "libtorch" in open(f"/proc/{tiny_cluster.of('token')[0].pid}/maps").read()  # what the check would see
