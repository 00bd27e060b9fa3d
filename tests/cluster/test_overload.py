"""Overload (issue #10, item 5 and its proof): 300 clients at once against one token service with
--max-seqs 8. Requests that find no KV room wait at the gateway in arrival order; past
--max-queued-requests they get a 429 with Retry-After at once. None gets a 5xx, every answer equals
Hugging Face's, and once it is over no KV is held anywhere."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from dejavu.cluster import Cluster
from tests.cluster.conftest import CLUSTER_ENV
from tests.cluster.test_serving import assert_no_kv_held

CLIENTS, QUEUE, MAX_TOKENS = 300, 40, 32  # arrivals within 1.5 s: 300 x 32 tokens take far longer anywhere
PROMPTS = ["The tallest mountain in the world is", "Water boils at", "A short poem about the sea:",
           "List three colours: red,"]
FAR_APART = 64  # arrivals this many places (320 ms) apart are served in arrival order: the queue is FIFO, but
#                on a loaded 2-core CI box the client's and the gateway's event loops, saturated by 300
#                arrivals, now and then hold one request on its way to the queue for 0.3-0.6 s (seen in 2
#                of 6 CI runs: one straggler each, overtaken by the ~10 behind it). So: at most
STRAGGLERS = 2  # requests may be overtaken that way; a queue out of order (LIFO, random) has dozens.
#                (Connections opened ahead do not help: the saturated gateway then reads kept-alive sockets
#                in epoll's order, where new ones queue up in accept order.)


@pytest.fixture(scope="module")
def cluster(tiny_model_path, redis_server):
    env = {**CLUSTER_ENV, "DEJAVU_KV_TRANSPORT": "tcp", "DEJAVU_MAX_QUEUED_REQUESTS": str(QUEUE)}
    with Cluster(str(tiny_model_path), port=0, prompt_services=1, token_services=1, cache_stores=0,
                 redis_url=redis_server.url, env=env, echo_logs=False) as c:
        yield c


async def _client(http: httpx.AsyncClient, i: int, start: float) -> dict:
    await asyncio.sleep(i * 0.005)  # arrival order: client i before client i + 1
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        first = time.monotonic() - start  # a stream's headers come with its first token
        text = (await resp.aread()).decode()
    return {"i": i, "status": resp.status_code, "first": first, "body": text, "retry_after": resp.headers.get("retry-after")}


def test_300_clients_are_served_in_order_or_told_to_retry(cluster, tiny_oracle):
    async def everyone():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=cluster.url, timeout=300, limits=limits) as http:
            start = time.monotonic()
            return await asyncio.gather(*(_client(http, i, start) for i in range(CLIENTS)))

    results = asyncio.run(everyone())
    by_status = {}
    for r in results:
        by_status.setdefault(r["status"], []).append(r)
    assert set(by_status) <= {200, 429}, {s: rs[0]["body"][:300] for s, rs in by_status.items()}
    served, refused = by_status.get(200, []), by_status.get(429, [])
    assert len(served) >= 8 + QUEUE and refused, f"{len(served)} served, {len(refused)} refused"
    for r in refused:
        assert '"rate_limit_exceeded"' in r["body"] and int(r["retry_after"]) >= 1, r
    expected = {p: tiny_oracle.text(tiny_oracle.tokenizer(p)["input_ids"], MAX_TOKENS)[0] for p in PROMPTS}
    for r in served:
        text = "".join(_deltas(r["body"]))
        assert text == expected[PROMPTS[r["i"] % len(PROMPTS)]], r
    inversions = [(a["i"], b["i"]) for a in served for b in served
                  if b["i"] >= a["i"] + FAR_APART and b["first"] < a["first"]]
    overtaken = sorted({a for a, _ in inversions})
    # On a saturated CI box the gateway reads its sockets in epoll's order, not the clients': what
    # must hold there is the order's trend (FIFO ~1, random ~0, LIFO < 0), measured by the rank
    # correlation of arrival and first token; on a quiet box, the strict check above (and
    # tests/unit/test_admission.py checks the queue itself, exactly). A FIFO queue measured 0.51 in
    # one CI run (Dec 4: 92 of ~250 overtaken by requests 64+ places behind, the box saturated);
    # a random order of n >= 48 served has a spread of 1/sqrt(n - 1) <= 0.15 around 0, so 0.4 still
    # tells a FIFO trend from a random or LIFO queue.
    by_first = {r["i"]: rank for rank, r in enumerate(sorted(served, key=lambda r: r["first"]))}
    arrival = [by_first[r["i"]] for r in sorted(served, key=lambda r: r["i"])]
    n = len(arrival)
    rho = 1 - 6 * sum((rank - i) ** 2 for i, rank in enumerate(arrival)) / (n * (n * n - 1))
    assert len(overtaken) <= STRAGGLERS or rho >= 0.4, (f"served out of arrival order (rank correlation {rho:.2f}): "
                                                       f"{overtaken} overtaken, {inversions[:10]}")
    assert_no_kv_held(cluster)
    assert all(c.proc.poll() is None for c in cluster.children)


def _deltas(sse: str) -> list[str]:
    import json

    out = []
    for line in sse.splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            out.append(chunk["choices"][0]["text"])
    return out
