"""Colocated mode (`dejavu up --colocated`): token services prefill their own requests and no
prompt service runs. Same API, same tokens (HF `generate`), same failure contract: a token service
killed mid-stream costs a pause, and the request resumes on the other one from its replica.
Also the other comparison mode of bench.stream: a prompt service that sends the KV in one message
after the forward pass (--kv-streaming after_prefill) instead of layer by layer."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from dejavu.cluster import Cluster
from tests.cluster.conftest import CLUSTER_ENV, metric
from tests.cluster.test_failover import assert_no_kv_held_on, stream, stream_with_fault

PROMPTS = ["The tallest mountain in the world is", "The tallest mountain in Europe is",  # same length: one batch
           "Once upon a time, in a land far away, there lived a dragon who", "Water boils at",
           "A short poem about the sea:", "List three colours: red,"]


@pytest.fixture(scope="module")
def cluster(tiny_model_path, redis_server):
    """Two colocated token services, a cache store, no prompt service."""
    env = {**CLUSTER_ENV, "DEJAVU_KV_TRANSPORT": "tcp", "DEJAVU_TOKEN_TIMEOUT_S": "3", "DEJAVU_COLOCATED": "true"}
    with Cluster(str(tiny_model_path), port=0, prompt_services=0, token_services=2, cache_stores=1,
                 redis_url=redis_server.url, env=env, echo_logs=False) as c:
        yield c


def prefills(cluster) -> float:
    return sum(metric(t.url, "dejavu_token_prefill_seconds_count") for t in cluster.of("token") if t.proc.poll() is None)


def complete_all(cluster, tiny_oracle, prompts: list[str] = PROMPTS, max_tokens: int = 40) -> None:
    """`prompts` at once, greedy: each text equals HF generate."""
    async def complete(client, prompt):
        resp = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["text"]

    async def all_of_them():
        async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as client:
            return await asyncio.gather(*(complete(client, p) for p in prompts))

    for prompt, text in zip(prompts, asyncio.run(all_of_them())):
        assert text == tiny_oracle.text(tiny_oracle.tokenizer(prompt)["input_ids"], max_tokens)[0], prompt


def test_concurrent_greedy_requests_equal_hf_without_a_prompt_service(cluster, tiny_oracle):
    view = httpx.get(cluster.url + "/cluster", timeout=10).json()
    assert view["counts"]["prompt"] == 0 and view["counts"]["token"] == 2
    assert all(s.get("colocated") for s in view["services"] if s["kind"] == "token")
    before = prefills(cluster)
    complete_all(cluster, tiny_oracle)
    assert 1 <= prefills(cluster) - before <= len(PROMPTS)  # same-length prompts may share a forward
    assert_no_kv_held_on(cluster)


def test_a_client_leaving_mid_stream_frees_the_row_and_the_replica(cluster):
    stream(cluster, {"prompt": PROMPTS[2], "max_tokens": 600, "temperature": 0, "ignore_eos": True}, close_at=3)
    assert_no_kv_held_on(cluster)


def test_a_killed_colocated_token_service_resumes_on_the_other_from_its_replica(cluster, tiny_oracle):
    """Last in this module: it leaves one token service dead."""
    want, n = tiny_oracle.text(tiny_oracle.tokenizer(PROMPTS[2])["input_ids"], 600)
    body = {"prompt": PROMPTS[2], "max_tokens": 600, "temperature": 0}
    text, usage, victims = stream_with_fault(cluster, body, signal.SIGKILL, after=30)
    assert victims and text == want and usage["completion_tokens"] == n
    assert metric(cluster.url, 'dejavu_gateway_recoveries_total{path="replica"}') == 1
    assert_no_kv_held_on(cluster)


def test_kv_sent_after_the_prefill_in_one_message_gives_the_same_tokens(tiny_model_path, redis_server, tiny_oracle):
    env = {**CLUSTER_ENV, "DEJAVU_KV_TRANSPORT": "tcp", "DEJAVU_KV_STREAMING": "after_prefill"}
    with Cluster(str(tiny_model_path), port=0, cache_stores=0, redis_url=redis_server.url, env=env,
                 echo_logs=False) as c:
        complete_all(c, tiny_oracle)
        assert_no_kv_held_on(c)


def test_penalties_logit_bias_and_min_tokens_equal_hf_colocated(cluster, tiny_oracle):
    """The first token is drawn where the prompt is prefilled, here the token service's own prefill."""
    from tests.cluster.test_serving import penalized_cases

    for body, want in penalized_cases(tiny_oracle):
        resp = httpx.post(cluster.url + "/v1/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] == tiny_oracle.tokenizer.decode(want, skip_special_tokens=True), body
    assert_no_kv_held_on(cluster)
