"""Chunked prefill: prompts longer than --max-batch-tokens (16 here) are prefilled in chunks, on a
prompt service (each chunk's KV streamed to the token service as it is computed, token range by
token range) and on a colocated token service (chunks riding along the decode steps of the
requests already running). Greedy text equals HF `generate` either way; nothing is left held."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from dejavu.cluster import Cluster
from tests.cluster.conftest import CLUSTER_ENV, metric
from tests.cluster.test_colocated import complete_all
from tests.cluster.test_failover import assert_no_kv_held_on
from tests.cluster.test_serving import completion

PROMPTS = ["Water boils at",  # shorter than a chunk
           "Once upon a time, in a land far away, there lived a dragon who loved to read books about the sea, "
           "the stars and the mountains, and every night",
           "List three colours, three animals and three cities, one per line, with a short reason for each: red,",
           "The tallest mountain in the world is"]


@pytest.fixture(scope="module", params=["disaggregated", "colocated"])
def cluster(request, tiny_model_path, redis_server):
    colocated = request.param == "colocated"
    env = {**CLUSTER_ENV, "DEJAVU_KV_TRANSPORT": "tcp", "DEJAVU_MAX_BATCH_TOKENS": "16",
           "DEJAVU_COLOCATED": str(colocated).lower()}
    with Cluster(str(tiny_model_path), port=0, prompt_services=0 if colocated else 1, cache_stores=1,
                 redis_url=redis_server.url, env=env, echo_logs=False) as c:
        c.prefill_kind = "token" if colocated else "prompt"
        yield c


def test_long_prompts_are_prefilled_in_chunks_and_equal_hf(cluster, tiny_oracle):
    lengths = [len(tiny_oracle.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert max(lengths) > 2 * 16 and min(lengths) < 16
    engine = cluster.of(cluster.prefill_kind)[0]
    forwards = f"dejavu_{cluster.prefill_kind}_prefill_seconds_count"
    before = metric(engine.url, forwards)
    complete_all(cluster, tiny_oracle, PROMPTS, max_tokens=30)
    assert metric(engine.url, forwards) - before >= sum(lengths) / 16  # no forward took more than a chunk
    assert_no_kv_held_on(cluster)


def test_echo_with_logprobs_scores_the_prompt_chunk_by_chunk_as_hf(cluster, tiny_oracle):
    """echo with logprobs, as lm-evaluation-harness asks for a loglikelihood: every prompt token's
    logprob after the tokens before it equals HF's log-softmax over the whole prompt, though it was
    computed in chunks of 16; max_tokens 0 gives back the prompt alone; streamed, the echo's chunk
    carries them. The text generated after them is HF's."""
    ids = tiny_oracle.tokenizer(PROMPTS[1])["input_ids"]
    assert len(ids) > 2 * 16
    with torch.inference_mode():
        want = torch.log_softmax(tiny_oracle.model(torch.tensor([ids])).logits[0].float(), dim=-1)
    body = {"prompt": ids, "echo": True, "logprobs": 2, "temperature": 0}

    alone = completion(cluster.url, **body, max_tokens=0)
    choice = alone["choices"][0]
    assert choice["text"] == tiny_oracle.tokenizer.decode(ids, skip_special_tokens=True)
    assert choice["finish_reason"] == "length" and alone["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["text_offset"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    expect = want[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), expect, rtol=0, atol=1e-4)
    for top, row, token, logprob in zip(lp["top_logprobs"][1:], want, lp["tokens"][1:], lp["token_logprobs"][1:]):
        assert len(top) in (2, 3) and max(top.values()) == pytest.approx(float(row.max()), abs=1e-4)
        assert next(iter(top.items())) == (token, logprob)  # the prompt's own token first, as OpenAI's
    assert "".join(lp["tokens"]) == choice["text"] and lp["text_offset"][0] == 0

    more = completion(cluster.url, **body, max_tokens=5)["choices"][0]
    want_text, _ = tiny_oracle.text(ids, 5)
    assert more["text"] == choice["text"] + want_text
    assert more["logprobs"]["token_logprobs"][:len(ids)] == pytest.approx(lp["token_logprobs"], abs=1e-5)
    assert len(more["logprobs"]["tokens"]) == len(ids) + 5
    ends = [o + len(t) for o, t in zip(more["logprobs"]["text_offset"], more["logprobs"]["tokens"])]
    assert more["logprobs"]["text_offset"] == [0] + ends[:-1]  # the generated offsets run on from the prompt's

    two = completion(cluster.url, **body, max_tokens=3, n=2)["choices"]  # the prompt scored once, shown twice
    assert [c["index"] for c in two] == [0, 1]
    assert two[0]["text"] == two[1]["text"] == choice["text"] + tiny_oracle.text(ids, 3)[0]
    for c in two:
        assert c["logprobs"]["token_logprobs"][:len(ids)] == pytest.approx(lp["token_logprobs"], abs=1e-5)

    resp = httpx.post(cluster.url + "/v1/completions", json={**body, "max_tokens": 0, "stream": True}, timeout=120)
    chunks = [json.loads(line[6:]) for line in resp.text.splitlines()
              if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["text"] == choice["text"]
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-5)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert_no_kv_held_on(cluster)


def test_a_prompt_sharing_a_prefix_computes_the_rest_only_and_equals_hf(cluster, tiny_oracle):
    """A chat's second turn starts with its first (system prompt, question, answer): the prompt
    service, or the colocated token service, reuses the KV it kept of the first turn's whole blocks
    (prefix cache) and computes the rest, in chunks; greedy text still equals HF generate."""
    tok = tiny_oracle.tokenizer
    first = tok("You are a helpful assistant who answers in French. " * 6 + "What is the capital of Italy?")["input_ids"]
    engine = cluster.of(cluster.prefill_kind)[0]
    hits = metric(engine.url, "dejavu_prompt_prefix_cache_hits_total")
    want, _ = tiny_oracle.text(first, 12)
    answer = completion(cluster.url, prompt=first, max_tokens=12, temperature=0)
    assert answer["choices"][0]["text"] == want and answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    second = first + tok(want + " And of Spain?", add_special_tokens=False)["input_ids"]
    forwards = f"dejavu_{cluster.prefill_kind}_prefill_seconds_count"
    before = metric(engine.url, forwards)
    want, _ = tiny_oracle.text(second, 12)
    answer = completion(cluster.url, prompt=second, max_tokens=12, temperature=0)
    assert answer["choices"][0]["text"] == want
    reused = metric(engine.url, "dejavu_prompt_prefix_cache_hits_total") - hits
    assert reused == len(first) // 16 * 16, (reused, len(first))  # every whole block of the first turn
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == reused  # OpenAI's usage field
    assert metric(engine.url, forwards) - before <= -(-(len(second) - reused) // 16)  # the rest's chunks only
    assert_no_kv_held_on(cluster)


def test_reset_prefix_cache_and_flush_cache_make_the_next_prompt_compute_whole(cluster, tiny_oracle):
    """vLLM's POST /reset_prefix_cache and SGLang's /flush_cache, which benchmark clients call
    between a warm-up and the measured run: a prompt whose blocks were cached is computed whole after
    either (cached_tokens 0, the cache empty), its text still HF's, and cached again after that."""
    ids = tiny_oracle.tokenizer("You are a helpful assistant who answers in Italian. " * 6 +
                                "What is the capital of France?")["input_ids"]
    engine = cluster.of(cluster.prefill_kind)[0]
    want, _ = tiny_oracle.text(ids, 8)

    def cached_tokens() -> int:
        answer = completion(cluster.url, prompt=ids, max_tokens=8, temperature=0)
        assert answer["choices"][0]["text"] == want
        return answer["usage"]["prompt_tokens_details"]["cached_tokens"]

    cached_tokens()
    hit = (len(ids) - 2) // 16 * 16  # every whole block but those in the last 2 tokens (MIN_COMPUTED)
    assert hit > 0 and cached_tokens() == hit
    resp = httpx.post(cluster.url + "/reset_prefix_cache", timeout=30)
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text
    assert metric(engine.url, "dejavu_prompt_prefix_cache_bytes") == 0
    assert cached_tokens() == 0 and cached_tokens() == hit
    resp = httpx.post(cluster.url + "/flush_cache", params={"timeout": 5}, timeout=30)
    assert resp.status_code == 200 and resp.text.startswith("Cache flushed"), resp.text
    assert cached_tokens() == 0
    resp = httpx.post(cluster.url + "/flush_cache", params={"timeout": -1}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "timeout", resp.text
    assert cached_tokens() == hit  # a refused flush flushed nothing
    assert_no_kv_held_on(cluster)
