"""Chunked prefill: prompts longer than --max-batch-tokens (16 here) are prefilled in chunks, on a
prompt service (each chunk's KV streamed to the token service as it is computed, token range by
token range) and on a colocated token service (chunks riding along the decode steps of the
requests already running). Greedy text equals HF `generate` either way; nothing is left held."""

from __future__ import annotations

import pytest

from dejavu.cluster import Cluster
from tests.cluster.conftest import CLUSTER_ENV, metric
from tests.cluster.test_colocated import complete_all
from tests.cluster.test_failover import assert_no_kv_held_on

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
