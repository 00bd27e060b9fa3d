"""KV replication to the cache store: the replica grows while a request decodes, the replicated
index in Redis advances only with it (data before metadata), and the replica is dropped at the end."""

from __future__ import annotations

import json

import httpx
import redis

from tests.cluster.conftest import metric
from tests.cluster.test_serving import assert_no_kv_held


def test_replica_follows_decoding_and_is_dropped(tiny_cluster, tiny_oracle, redis_server):
    store, token = tiny_cluster.of("cache_store")[0], tiny_cluster.of("token")[0]
    meta = redis.Redis.from_url(redis_server.url, decode_responses=True)
    body = {"prompt": "Once upon a time", "max_tokens": 700, "temperature": 0, "ignore_eos": True, "stream": True}
    prompt_len = len(tiny_oracle.tokenizer(body["prompt"])["input_ids"])
    samples = []  # (chunks streamed, replica bytes on the store, replicated index in Redis), every 25 chunks
    with httpx.stream("POST", tiny_cluster.url + "/v1/completions", json=body, timeout=120) as resp:
        request_id, n, running = None, 0, True
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            request_id, n = json.loads(line[6:])["id"].removeprefix("cmpl-"), n + 1
            if running and n % 25 == 0:  # Redis first, then the store: the store must already hold what Redis says
                rep = int(meta.hget(f"dejavu:req:{request_id}", "replicated") or 0)
                got = httpx.get(f"{store.url}/replicas/{request_id}", headers=tiny_cluster.internal_headers, timeout=10)
                held = got.json() if got.status_code == 200 else {"tokens": 0, "answer": got.text}  # none yet (404)
                held_bytes = metric(store.url, "dejavu_cache_store_bytes_held")
                if not (running := metric(token.url, "dejavu_token_sequences") > 0):
                    continue  # the server is ahead of us and done: its replica may be dropped already
                assert held["tokens"] >= rep, (n, rep, held)  # invariant 1: data before metadata
                samples.append((n, held_bytes, rep))
    # The index advances as decoding goes on, the replica on the store with it. Replication runs
    # beside decoding, as fast as the store acknowledges (one message in flight per request): how
    # far behind the stream it is depends on the host's load, so no sample is pinned to a position
    # (a CI run once had no index yet at chunk 100 and 319 tokens at chunk 300).
    advanced = [(n, b, rep) for n, b, rep in samples if rep >= prompt_len]
    logs = "\n".join(list(token.tail)[-12:])
    assert len({rep for *_, rep in advanced}) >= 2, (samples, logs)
    (_, bytes1, rep1), (_, bytes2, rep2) = advanced[0], advanced[-1]
    assert rep2 > rep1 and bytes2 > bytes1 > 0, (samples, logs)
    assert meta.hget(f"dejavu:req:{request_id}", "store").startswith("cache_store")
    final = int(meta.hget(f"dejavu:req:{request_id}", "replicated"))
    assert final <= prompt_len + 700                           # never past the KV that exists
    assert_no_kv_held(tiny_cluster)                           # the replica is dropped at the end
