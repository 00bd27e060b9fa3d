"""KV replication to the cache store: the replica grows while a request decodes, the replicated
index in Redis advances only with it (data before metadata), and the replica is dropped at the end."""

from __future__ import annotations

import json

import httpx
import redis

from tests.cluster.conftest import metric
from tests.cluster.test_serving import assert_no_kv_held


def test_replica_follows_decoding_and_is_dropped(tiny_cluster, tiny_oracle, redis_server):
    store = tiny_cluster.of("cache_store")[0]
    meta = redis.Redis.from_url(redis_server.url, decode_responses=True)
    body = {"prompt": "Once upon a time", "max_tokens": 700, "temperature": 0, "ignore_eos": True, "stream": True}
    prompt_len = len(tiny_oracle.tokenizer(body["prompt"])["input_ids"])
    seen = []  # (chunks streamed, replica bytes on the store, replicated index in Redis)
    with httpx.stream("POST", tiny_cluster.url + "/v1/completions", json=body, timeout=120) as resp:
        request_id = None
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            request_id = event["id"].removeprefix("cmpl-")
            n = len(seen) + 1
            if n in (100, 300):  # Redis first, then the store: the store must already hold what Redis says
                rep = int(meta.hget(f"dejavu:req:{request_id}", "replicated") or 0)
                got = httpx.get(f"{store.url}/replicas/{request_id}", headers=tiny_cluster.internal_headers, timeout=10)
                held = got.json() if got.status_code == 200 else {"tokens": 0, "answer": got.text}  # none yet (404)
                assert held["tokens"] >= rep, (rep, held)        # invariant 1: data before metadata
                assert meta.hget(f"dejavu:req:{request_id}", "store").startswith("cache_store")
                seen.append((n, metric(store.url, "dejavu_cache_store_bytes_held"), rep))
            else:
                seen.append(None)
    samples = [s for s in seen if s]
    (n1, bytes1, rep1), (n2, bytes2, rep2) = samples
    assert rep1 >= prompt_len and rep2 > rep1, samples       # the index advances as decoding goes on
    assert bytes2 > bytes1 > 0, samples                      # the replica on the store grows with it
    final = int(meta.hget(f"dejavu:req:{request_id}", "replicated"))
    assert final <= prompt_len + 700                           # never past the KV that exists
    assert_no_kv_held(tiny_cluster)                           # the replica is dropped at the end
