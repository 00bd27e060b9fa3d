"""A token service that dies or hangs mid-stream costs the client a pause, not the request: the
gateway fences it, another token service restores the KV from the request's replica on the cache
store ("replica"), or, with no usable replica, a prompt service prefills the prompt again
("reprefill"); the new token service replays the tokens streamed after that and decoding
continues at the next output index. The text equals HF `generate`
(greedy) or the failure-free run (seeded sampling). Real processes, real signals."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time

import httpx
import pytest

from dejavu.cluster import Cluster
from tests.cluster.conftest import CLUSTER_ENV, metric
from tests.cluster.test_serving import assert_no_kv_held

PROMPT = "Once upon a time, in a land far away, there lived a dragon who"
MAX_TOKENS = 900  # long enough to act mid-stream (prompt + 900 < the 1024-token context)


@pytest.fixture(scope="module", params=["replica", "reprefill"])
def path_cluster(request, tiny_model_path, redis_server):
    """Two token services (a spare), one prompt service, a cache store or none (the recovery path);
    a silent stream counts as hung after 3 s; a request with no token service left fails after 8 s
    (long enough for a lone stopped one's lease to lapse meanwhile: the lone tests).
    One a path, for the module's tests (`cluster` puts back what a test killed)."""
    env = {**CLUSTER_ENV, "DEJAVU_KV_TRANSPORT": "tcp", "DEJAVU_TOKEN_TIMEOUT_S": "3", "DEJAVU_RESUME_WAIT_S": "8"}
    stores = 1 if request.param == "replica" else 0
    env["DEJAVU_MEMORY_BYTES"] = "1024"  # the store spills most of a replica: restores read the disk
    with Cluster(str(tiny_model_path), port=0, token_services=2, cache_stores=stores, redis_url=redis_server.url,
                 env=env, echo_logs=False) as c:
        c.path = request.param
        yield c
        wake(c)


@pytest.fixture
def cluster(path_cluster):
    """The path's cluster with both token services running (those a test before killed started
    again: a cluster a test took 9-14 s to start), and its recoveries counted from here (`recoveries`)."""
    c = path_cluster
    new = [c.respawn(t) for t in c.of("token") if t.proc.poll() is not None]
    c.wait_ready(60, new)
    assert_no_kv_held_on(c)  # what a test before left (its request's replica dropped late) is gone
    c.spilled = None
    c.recovered_before = metric(c.url, f'dejavu_gateway_recoveries_total{{path="{c.path}"}}')
    yield c
    wake(c)


def wake(cluster) -> None:
    for child in cluster.of("token"):  # a stopped one must run again to stop
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGCONT)


def recoveries(cluster) -> float:
    """Requests the gateway resumed since the test began, on the cluster's path."""
    return metric(cluster.url, f'dejavu_gateway_recoveries_total{{path="{cluster.path}"}}') - cluster.recovered_before


def holds_kv(child) -> bool:
    """A live token service with a sequence; one killed a moment ago may not be reaped yet (a big
    process takes a while to die) but no longer answers: it holds nothing."""
    try:
        return child.proc.poll() is None and metric(child.url, "dejavu_token_sequences") > 0
    except httpx.TransportError:
        return False


def serving(cluster):
    """The token service holding KV right now."""
    holders = [t for t in cluster.of("token") if holds_kv(t)]
    assert len(holders) == 1, "exactly one token service should hold the request"
    return holders[0]


def events(cluster, path: str, body: dict):
    """The JSON events of a streamed answer from `path`, as they come; an error event fails the test."""
    with httpx.stream("POST", cluster.url + path, json=body, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                yield event


def stream(cluster, body: dict, at: dict | None = None, close_at: int | None = None,
           logprobs: list | None = None) -> tuple[str, dict, str]:
    """Stream a completion, calling at[n](cluster) after n chunks (and leaving after close_at), the
    tokens' logprobs added to `logprobs` (the body asking for them). Returns (text, usage, request
    id); an error event fails the test."""
    text, usage, rid = [], None, None
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with contextlib.closing(events(cluster, "/v1/completions", body)) as answer:  # closed at once on leaving
        for event in answer:
            rid, usage = event["id"].removeprefix("cmpl-"), event.get("usage") or usage
            if event["choices"]:
                text.append(event["choices"][0]["text"])
                if logprobs is not None:
                    logprobs += event["choices"][0]["logprobs"]["token_logprobs"]
                if at and len(text) in at:
                    at[len(text)](cluster)
                if len(text) == close_at:
                    break
    return "".join(text), usage, rid


def stream_with_fault(cluster, body: dict, sig: int | None, after: int = 20,
                      logprobs: list | None = None) -> tuple[str, dict, list]:
    """Stream a completion; after `after` chunks send `sig` to the token service serving it."""
    victims = []

    def fault(c):
        for store in c.of("cache_store"):
            c.spilled = metric(store.url, "dejavu_cache_store_bytes_spilled")
        victims.append(serving(c))
        c.kill(victims[-1], sig)

    text, usage, _ = stream(cluster, body, at={after: fault} if sig is not None else None, logprobs=logprobs)
    return text, usage, victims


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_greedy_stream_survives_a_token_service_failure(cluster, tiny_oracle, sig):
    ids = tiny_oracle.tokenizer(PROMPT)["input_ids"]
    want, n = tiny_oracle.text(ids, MAX_TOKENS)
    text, usage, victims = stream_with_fault(cluster, {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}, sig)
    assert victims, "the fault was never injected"
    assert text == want
    assert usage["completion_tokens"] == n
    assert recoveries(cluster) == 1
    assert cluster.path == "reprefill" or cluster.spilled > 0  # restored (in part) from disk
    if sig == signal.SIGSTOP:  # the hung owner wakes up fenced: it frees its row and writes nothing
        victims[0].proc.send_signal(signal.SIGCONT)
    assert_no_kv_held_on(cluster)


def test_seeded_sampling_is_identical_across_a_failover(cluster):
    """The same text, and the same logprobs to the bit: a draw moves only where two tokens' odds
    are that close (common/sampling.py), so the text alone would pass a resume whose logits are
    off in their last bits; the logprobs show the rows are computed as before (the KV replayed)."""
    body = {"prompt": PROMPT, "max_tokens": 300, "temperature": 0.8, "top_p": 0.95, "seed": 7, "ignore_eos": True,
            "logprobs": 1}
    clean_logprobs, logprobs = [], []
    clean, _, _ = stream_with_fault(cluster, body, None, logprobs=clean_logprobs)
    failed, usage, victims = stream_with_fault(cluster, body, signal.SIGKILL, after=40, logprobs=logprobs)
    assert victims and failed == clean and usage["completion_tokens"] == 300
    assert len(clean_logprobs) == 300 and logprobs == clean_logprobs
    assert recoveries(cluster) == 1
    assert_no_kv_held_on(cluster)


def test_a_responses_api_stream_survives_a_token_service_failure(cluster):
    """POST /v1/responses, streamed and seeded: the token service is killed mid-stream, and the
    events go on to response.completed/incomplete with the clean run's text and usage."""
    body = {"input": PROMPT, "max_output_tokens": 200, "temperature": 0.8, "seed": 5, "ignore_eos": True,
            "stream": True}

    def run(kill_after: int | None) -> tuple[str, dict]:
        text, last = [], None
        with httpx.stream("POST", cluster.url + "/v1/responses", json=body, timeout=120) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    last = json.loads(line[6:])
                    assert last["type"] != "response.failed", last
                    if last["type"] == "response.output_text.delta":
                        text.append(last["delta"])
                        if len(text) == kill_after:
                            cluster.kill(serving(cluster), signal.SIGKILL)
        assert last["type"] == "response.incomplete"  # max_output_tokens reached
        return "".join(text), last["response"]

    clean, clean_response = run(None)
    failed, response = run(40)
    assert failed == clean and response["output"][0]["content"][0]["text"] == clean
    counts = [{k: v for k, v in r["usage"].items() if k != "input_tokens_details"} for r in (response, clean_response)]
    assert counts[0] == counts[1] and counts[0]["output_tokens"] == 200  # the prompt is cached the second time
    assert recoveries(cluster) == 1
    assert_no_kv_held_on(cluster)


def test_an_anthropic_messages_stream_survives_a_token_service_failure(cluster):
    """POST /v1/messages through the anthropic SDK's stream helper, seeded: the token service is
    killed mid-stream, and the SDK's message ends as the clean run's, text and usage."""
    import anthropic

    client = anthropic.Anthropic(base_url=cluster.url, api_key="unused", max_retries=0, timeout=120)
    ask = dict(model=httpx.get(cluster.url + "/v1/models", timeout=10).json()["data"][0]["id"], max_tokens=200,
               messages=[{"role": "user", "content": PROMPT}],
               extra_body={"temperature": 0.8, "seed": 5, "ignore_eos": True})

    def run(kill_after: int | None):
        pieces = []
        with client.messages.stream(**ask) as stream:
            for event in stream:
                if event.type == "text":
                    pieces.append(event.text)
                    if len(pieces) == kill_after:
                        cluster.kill(serving(cluster), signal.SIGKILL)
            return "".join(pieces), stream.get_final_message()

    clean, clean_message = run(None)
    failed, message = run(40)
    assert failed == clean == message.content[0].text and message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == clean_message.usage.output_tokens == 200
    assert recoveries(cluster) == 1
    assert_no_kv_held_on(cluster)


def test_an_sglang_generate_stream_survives_a_token_service_failure(cluster):
    """SGLang's POST /generate, streamed and seeded (sampling_seed): the token service is killed
    mid-stream, and the cumulative events go on to the clean run's whole answer, ids and text."""
    body = {"text": PROMPT, "stream": True, "sampling_params": {
        "max_new_tokens": 200, "temperature": 0.8, "sampling_seed": 5, "ignore_eos": True}}

    def run(kill_after: int | None) -> dict:
        last = None
        for event in events(cluster, "/generate", body):
            assert last is None or event["output_ids"][:len(last["output_ids"])] == last["output_ids"]
            last = event
            if event["meta_info"]["completion_tokens"] == kill_after:
                cluster.kill(serving(cluster), signal.SIGKILL)
        return last

    clean, failed = run(None), run(40)
    assert failed["output_ids"] == clean["output_ids"] and failed["text"] == clean["text"]
    assert failed["meta_info"]["finish_reason"] == {"type": "length", "length": 200}
    assert recoveries(cluster) == 1
    assert_no_kv_held_on(cluster)


def test_the_choices_of_one_request_survive_a_token_service_failure(cluster):
    """n = 2, seeded, streamed: each choice is a request of its own, so the one whose token service
    is killed resumes elsewhere while the other goes on; both texts are a clean run's."""
    body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 0.8, "seed": 11, "ignore_eos": True, "n": 2,
            "stream": True}

    def run(kill_after: int | None) -> dict[int, str]:
        texts = {0: "", 1: ""}
        for chunks, event in enumerate(events(cluster, "/v1/completions", body), 1):
            for c in event["choices"]:
                texts[c["index"]] += c["text"]
            if chunks == kill_after:
                cluster.kill(next(t for t in cluster.of("token") if holds_kv(t)), signal.SIGKILL)
        return texts

    clean = run(None)
    assert len(set(clean.values())) == 2  # seed + i: the choices differ
    assert run(40) == clean
    assert recoveries(cluster) >= 1
    assert_no_kv_held_on(cluster)


def test_a_request_that_cannot_be_saved_ends_with_an_error_event(cluster):
    """Both token services die serving it, the second after it took the request over: no third."""
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    events, killed = [], []

    def kill_each_owner() -> None:  # the first, then the one it resumed on (not at a chunk count: the
        for _ in range(2):          # client reads chunks sent before the kill while the resume runs)
            deadline = time.monotonic() + 30
            while not (owners := [t for t in cluster.of("token") if holds_kv(t)]):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.02)
            cluster.kill(owners[0], signal.SIGKILL)
            killed.append(owners[0])

    killer = threading.Thread(target=kill_each_owner, daemon=True)
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 10:
                    killer.start()
    killer.join(30)
    assert len(killed) == 2, events[-3:]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    request_id = json.loads(events[0])["id"].removeprefix("cmpl-")
    assert error["type"] == "server_error" and error["code"] == "resume_failed"
    assert error["message"].startswith("the token service serving this request failed and the request could not be")
    assert request_id in error["message"] and "127.0.0.1" not in error["message"]  # the log says which, not the client
    assert_no_kv_held_on(cluster)  # the gateway dropped the replica the dead owners left


def test_a_lone_token_service_that_hangs_and_wakes_resumes_its_own_requests(cluster, tiny_oracle):
    """The only token service (`dejavu up`'s one) hangs mid-stream past its lease, then wakes:
    nothing else could take its request, which waited out --resume-wait-s and failed (a probe: 5 of
    5 streams, after 64 s, for a 6 s SIGSTOP). Now the request resumes where it failed, once its old
    copy there is aborted; the woken service's end of the old stream aborts nothing of the new."""
    for spare in cluster.of("token")[1:]:
        cluster.kill(spare, signal.SIGKILL)  # (put back for the next test by the fixture)
    lone, woken, deadline = cluster.of("token")[0], [], time.monotonic() + 30
    while httpx.get(cluster.url + "/health", timeout=10).json().get("token_services") != 1:  # the spare forgotten
        assert time.monotonic() < deadline, "the gateway still lists the killed token service"
        time.sleep(0.2)

    def wake_once_waiting() -> None:  # the resumed request queued for a token service: none is up
        deadline = time.monotonic() + 30
        while metric(cluster.url, "dejavu_gateway_queued_requests") < 1:
            assert time.monotonic() < deadline, "the request never waited for a token service"
            time.sleep(0.05)
        lone.proc.send_signal(signal.SIGCONT)
        woken.append(time.monotonic())

    def hang(c):
        c.kill(lone, signal.SIGSTOP)
        threading.Thread(target=wake_once_waiting, daemon=True).start()

    ids = tiny_oracle.tokenizer(PROMPT)["input_ids"]
    want, n = tiny_oracle.text(ids, 150)
    text, usage, _ = stream(cluster, {"prompt": PROMPT, "max_tokens": 150, "temperature": 0}, at={20: hang})
    assert woken, "the token service was never woken"
    assert text == want and usage["completion_tokens"] == n
    assert recoveries(cluster) == 1
    assert lone.proc.poll() is None  # the same process, serving again
    assert_no_kv_held_on(cluster)


def test_a_new_request_waits_for_a_lone_token_service_that_hangs(cluster, tiny_oracle):
    """The only token service stops past its lease (a probe: every new request got a 503 while
    `dejavu up`'s one was stopped 6 s): a request that arrives then waits for it, as a resumed one
    does, and is served once it is back."""
    for spare in cluster.of("token")[1:]:
        cluster.kill(spare, signal.SIGKILL)  # (put back for the next test by the fixture)
    lone, deadline, answer = cluster.of("token")[0], time.monotonic() + 30, []

    def until(done, failure: str) -> None:
        while not done():
            assert time.monotonic() < deadline, failure
            time.sleep(0.05)

    until(lambda: httpx.get(cluster.url + "/health", timeout=10).json().get("token_services") == 1,
          "the gateway still lists the killed token service")
    cluster.kill(lone, signal.SIGSTOP)
    until(lambda: httpx.get(cluster.url + "/health", timeout=10).status_code == 503,  # its lease lapsed
          "the gateway still lists the stopped token service")
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    late = threading.Thread(target=lambda: answer.append(httpx.post(cluster.url + "/v1/completions", json=body,
                                                                    timeout=120)))
    late.start()
    until(lambda: metric(cluster.url, "dejavu_gateway_queued_requests") >= 1 or answer,
          "the request never waited for a token service")
    assert not answer, f"answered while no token service was up: {answer[0].text}"
    lone.proc.send_signal(signal.SIGCONT)
    late.join(60)
    assert answer, "the request was not answered within 60 s of the token service's waking"
    assert answer[0].status_code == 200, answer[0].text
    assert answer[0].json()["choices"][0]["text"] == tiny_oracle.text(tiny_oracle.tokenizer(PROMPT)["input_ids"], 8)[0]
    assert_no_kv_held_on(cluster)


def assert_no_kv_held_on(cluster) -> None:
    """No KV anywhere, on the services still running (a dead one has no metrics)."""
    class View:
        url = cluster.url

        def of(self, kind):
            return [c for c in cluster.of(kind) if c.proc.poll() is None]

    assert_no_kv_held(View())
