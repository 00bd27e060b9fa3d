"""Prefix caching on a prompt service (engine/prefix_cache.py): blocks found only behind
the same prefix, least recently used out first (a chain's tail before its head), and a prompt that
hits sends the token service the same KV and the same first token as one computed whole."""

from __future__ import annotations

import asyncio

import pytest
import torch

from common.protocol import PrefillRequest, SamplingParams, block_keys
from common.settings import PromptSettings
from engine.prefix_cache import PrefixCache

pytestmark = pytest.mark.asyncio
SHAPE = (3, 2, 4, 2, 16)  # (layers, 2, block_size, kv_heads, head_dim)


def kv(i: int) -> torch.Tensor:
    return torch.full(SHAPE, float(i))


async def test_blocks_are_found_behind_the_same_prefix_only_and_the_tail_goes_first():
    cache = PrefixCache(capacity_bytes=4 * kv(0).nbytes, block_size=4)
    a = list(range(1, 15))                      # 3 whole blocks and 2 tokens
    keys, hit = cache.lookup(a)
    assert len(keys) == 3 and hit == []
    cache.insert(keys, {i: kv(i) for i in range(3)}, 0)
    assert [int(b[0, 0, 0, 0, 0]) for b in cache.lookup(a)[1]] == [0, 1, 2]
    assert len(cache.lookup(a[:13])[1]) == 2     # two tokens at least are computed: block 2 is not a hit here
    assert len(cache.lookup(a[:4] + [99] + a[5:])[1]) == 1  # block 1 differs: nothing behind it is reused
    assert block_keys([9] + a[1:], 4)[1] != keys[1]  # the same tokens behind another prefix: another key
    b = [50] * 10
    cache.insert(block_keys(b, 4), {0: kv(10), 1: kv(11)}, 0)  # 5 blocks > 4: a's tail (least recently used) goes
    assert len(cache.blocks) == 4 and cache.bytes == 4 * kv(0).nbytes
    assert len(cache.lookup(a)[1]) == 2 and len(cache.lookup(b)[1]) == 2
    cache.insert(block_keys(list(range(100, 120)), 4), {i: kv(i) for i in range(5)}, 0)  # 5 blocks: 4 kept, head first
    assert len(cache.lookup(list(range(100, 121)))[1]) == 4 and not cache.lookup(a)[1]


async def test_a_reset_forgets_every_block_and_keeps_none_a_prefill_from_before_it_computes():
    from engine.prefix_cache import CACHED_BYTES, reset

    cache = PrefixCache(capacity_bytes=8 * kv(0).nbytes, block_size=4)
    a, b = list(range(1, 15)), list(range(20, 34))
    keys, _ = cache.lookup(a)
    cache.insert(keys, {i: kv(i) for i in range(3)}, cache.generation)
    started = cache.generation  # b's prefill starts before the reset and ends after it
    assert len(cache.lookup(a)[1]) == 3
    assert reset(cache) == (3, 3 * kv(0).nbytes)
    assert cache.lookup(a)[1] == [] and cache.bytes == 0 and CACHED_BYTES._value.get() == 0
    cache.insert(block_keys(b, 4), {i: kv(i) for i in range(3)}, started)
    assert cache.lookup(b)[1] == [] and not cache.blocks
    cache.insert(keys, {i: kv(i) for i in range(3)}, cache.generation)  # a prefill after the reset: kept
    assert len(cache.lookup(a)[1]) == 3
    assert reset(None) == (0, 0)


async def test_a_colocated_prefill_started_before_a_reset_keeps_nothing_it_computes():
    """token_service/prefill.py: a prompt's chunk planned before a reset of the cache and finished
    after it keeps none of its blocks; the same chunk planned after the reset keeps them."""
    from token_service.prefill import PrefillJob, PrefillQueue
    from token_service.sequence import Sequence

    cache = PrefixCache(capacity_bytes=8 * kv(0).nbytes, block_size=4)
    queue = PrefillQueue(budget=8, release=lambda seq: None, cache=cache, block_bytes=kv(0).nbytes)

    def planned():
        queue.jobs.clear()
        req = PrefillRequest(request_id="r", prompt_ids=list(range(1, 13)), sampling=SamplingParams(),
                             target_service_id="t", target_kv_address="")
        seq = Sequence("r", prompt_len=12, max_tokens=4, num_layers=3, blocks=[0, 1, 2, 3])
        queue.add(PrefillJob(seq, req, asyncio.get_running_loop().create_future()))
        [chunk] = queue.next_chunks()
        assert chunk.keep == [0, 1] and not chunk.last  # tokens [0, 8) of 12 complete blocks 0 and 1
        return chunk

    chunk = planned()
    cache.clear()
    queue.finish([chunk], torch.zeros(1, 8), [[]], [{i: kv(i) for i in chunk.keep}])
    assert not cache.blocks
    chunk = planned()
    queue.finish([chunk], torch.zeros(1, 8), [[]], [{i: kv(i) for i in chunk.keep}])
    assert len(cache.blocks) == 2


async def test_a_prompt_that_hits_gets_the_kv_and_first_token_of_one_computed_whole(tiny_model_path, monkeypatch):
    """Prompt A, then B sharing A's first 6 blocks and its own rest: B computes only the rest (the
    prefix's KV sent first, from the cache), and what the token service receives for B is what a
    service without a cache sends, token for token and layer for layer; so is its first token."""
    import prompt_service.engine as prompt_engine
    from common.model import load_model
    from engine.runner import ModelRunner
    from engine.prefix_cache import HIT_TOKENS
    from prompt_service.engine import PrefillEngine

    sent: dict[str, list[tuple]] = {}

    async def no_links(*args):
        return []

    async def capture(outbox, links, request_id, epoch, ended, acks):  # the token service's side
        while (item := await outbox.get()) is not None:
            sent.setdefault(request_id, []).append(item)

    monkeypatch.setattr(prompt_engine, "open_links", no_links)
    monkeypatch.setattr(prompt_engine, "send_messages", capture)
    runner = ModelRunner(load_model(tiny_model_path), block_size=4)

    async def prefill(engine, rid: str, ids: list[int], kept: bool = True):
        req = PrefillRequest(request_id=rid, prompt_ids=ids, sampling=SamplingParams(temperature=0),
                             target_service_id="t", target_kv_address="")
        task = asyncio.create_task(engine.run())
        try:
            first = (await asyncio.wait_for(engine.submit(req), 30)).first.token_id
            assert not kept or not engine.cache or not engine.cache.missing(block_keys(ids, 4))  # kept by the answer
            return first
        finally:
            task.cancel()

    def received(rid: str, n: int) -> torch.Tensor:
        out = torch.full((3, 2, n, 2, 16), float("nan"))
        for layer_start, layer_end, token_start, token_end, buf in sent[rid]:
            out[layer_start:layer_end, :, token_start:token_end] = buf
        assert not out.isnan().any()
        return out

    generator = torch.Generator().manual_seed(3)
    a = torch.randint(3, 49152, (30,), generator=generator).tolist()
    b = a[:24] + torch.randint(3, 49152, (9,), generator=generator).tolist()
    cached = PrefillEngine(runner, PromptSettings(prefix_cache_mib=16, kv_stream_layers=1), peers=None)
    plain = PrefillEngine(runner, PromptSettings(prefix_cache_mib=0, kv_stream_layers=1), peers=None)
    before = HIT_TOKENS._value.get()
    await prefill(cached, "a", a)
    first = await prefill(cached, "b", b)
    assert HIT_TOKENS._value.get() - before == 24
    assert [m[2:4] for m in sent["b"]][:3] == [(0, 24)] * 3  # the prefix first, one message a layer
    assert {m[2:4] for m in sent["b"][3:]} == {(24, 33)}
    assert first == await prefill(plain, "b-whole", b)
    assert torch.equal(received("b", 33), received("b-whole", 33))  # to the bit (MIN_COMPUTED says why)
    # the same prompt again: all of it but its last 5 tokens from the cache (two at least are computed)
    again = await prefill(cached, "b-again", b)
    assert again == first and HIT_TOKENS._value.get() - before == 24 + 28
    assert torch.equal(received("b-again", 33), received("b", 33))  # a re-prefill gets the KV b's prefill had
    assert not cached.jobs and not plain.jobs
    # a reset while a prompt's forward computes: the blocks it computed are not kept; after it, they are
    cached.cache.clear()
    run = runner.run

    async def reset_meanwhile(*args):
        cached.cache.clear()
        return await run(*args)

    monkeypatch.setattr(runner, "run", reset_meanwhile)
    await prefill(cached, "c", a[:20], kept=False)
    assert not cached.cache.blocks
    monkeypatch.setattr(runner, "run", run)
    await prefill(cached, "c-after", a[:20])
    assert len(cached.cache.blocks) == 5


async def test_hits_batch_with_other_prompts_in_chunks_alone_and_a_long_prompt_leaves_shared_blocks(
        tiny_model_path, monkeypatch):
    """Prompts submitted at once to a service with small forwards (16 tokens): the rests of hits
    share forwards with whole prompts and with each other (their shared blocks in the forward's pool
    once); a hit longer than a forward runs alone, chunk after chunk; each first token and the KV
    each sends equal a service's without a cache. Then a prompt longer than the cache takes at most
    half of it: the blocks the others share stay."""
    import prompt_service.engine as prompt_engine
    from common.model import load_model
    from engine.runner import ModelRunner
    from prompt_service.engine import PrefillEngine

    sent: dict[str, list[tuple]] = {}

    async def no_links(*args):
        return []

    async def capture(outbox, links, request_id, epoch, ended, acks):
        while (item := await outbox.get()) is not None:
            sent.setdefault(request_id, []).append(item)

    monkeypatch.setattr(prompt_engine, "open_links", no_links)
    monkeypatch.setattr(prompt_engine, "send_messages", capture)
    runner = ModelRunner(load_model(tiny_model_path), block_size=4)
    generator = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 49152, (20,), generator=generator).tolist()
    prompts = {"new": torch.randint(3, 49152, (5,), generator=generator).tolist()}  # nothing to reuse: batched
    prompts |= {f"p{i}": shared + torch.randint(3, 49152, (n,), generator=generator).tolist()
                for i, n in enumerate((2, 30, 3, 12))}
    forwards: list[list[tuple]] = []
    execute = PrefillEngine._execute

    async def recorded(engine, work):
        forwards.append([(p.job.req.request_id, p.start, p.end) for p in work])
        return await execute(engine, work)

    monkeypatch.setattr(PrefillEngine, "_execute", recorded)

    async def serve(engine, tag: str) -> dict[str, int]:
        task = asyncio.create_task(engine.run())
        try:
            await asyncio.wait_for(engine.submit(PrefillRequest(
                request_id=f"{tag}-warm", prompt_ids=shared + [7], sampling=SamplingParams(temperature=0),
                target_service_id="t", target_kv_address="")), 30)
            results = await asyncio.wait_for(asyncio.gather(*(engine.submit(PrefillRequest(
                request_id=f"{tag}-{rid}", prompt_ids=ids, sampling=SamplingParams(temperature=0),
                target_service_id="t", target_kv_address="")) for rid, ids in prompts.items())), 60)
            return {rid: r.first.token_id for rid, r in zip(prompts, results)}
        finally:
            task.cancel()

    settings = dict(max_batch_tokens=16, kv_stream_layers=1)
    cached = PrefillEngine(runner, PromptSettings(prefix_cache_mib=16, **settings), peers=None)
    plain = PrefillEngine(runner, PromptSettings(prefix_cache_mib=0, **settings), peers=None)
    pools: list[int] = []  # the blocks of each pool made (a chunked prompt's, or a forward's with hits)
    new_pool = runner.new_pool
    monkeypatch.setattr(runner, "new_pool", lambda n, *args: pools.append(n) or new_pool(n, *args))
    firsts = await serve(cached, "c")
    assert pools == [6, 8, 13, 9]  # warm's chunks; new (2) + p0 (5 hit, 1); p1's chunks; p2 and p3: 5 shared + 1 + 3
    assert firsts == await serve(plain, "p")
    assert all(sent["c-p2"][i][4] is sent["c-p3"][i][4] for i in range(3))  # one buffer for their prefix's messages
    assert forwards[:6] == [[("c-warm", 0, 16)], [("c-warm", 16, 21)],  # chunks alone
                            [("c-new", 0, 5), ("c-p0", 20, 22)],          # a whole prompt and a hit's rest
                            [("c-p1", 20, 36)], [("c-p1", 36, 50)],       # a hit longer than a forward: chunks
                            [("c-p2", 20, 23), ("c-p3", 20, 32)]]         # two hits, their 5 shared blocks once
    monkeypatch.setattr(prompt_engine, "HIT_BATCH_BYTES", 0)  # no room beyond a first piece's own: hits alone
    bounded = PrefillEngine(runner, PromptSettings(prefix_cache_mib=16, **settings), peers=None)
    forwards.clear()
    assert await serve(bounded, "z") == await serve(plain, "q")
    assert [[p[0] for p in f] for f in forwards[:7]] == [["z-warm"], ["z-warm"], ["z-new"], ["z-p0"], ["z-p1"],
                                                          ["z-p1"], ["z-p2"]]
    for rid, ids in prompts.items():
        got, want = (torch.full((3, 2, len(ids), 2, 16), float("nan")) for _ in range(2))
        for out, tag in ((got, "c"), (want, "p")):
            for layer_start, layer_end, token_start, token_end, buf in sent[f"{tag}-{rid}"]:
                out[layer_start:layer_end, :, token_start:token_end] = buf
        assert not got.isnan().any()
        assert torch.equal(got, want), rid
        assert rid == "new" or sent[f"c-{rid}"][0][2:4] == (0, 20), rid  # each hit its 5 shared blocks first
    block = next(iter(cached.cache.blocks.values())).nbytes
    cached.cache.capacity = 9 * block  # room for 9 blocks: the shared 5, 4 others, then a long prompt's half (4)
    cached.cache.insert([], {}, 0)
    before = set(block_keys(shared, 4))
    assert before <= set(cached.cache.blocks)
    long = torch.randint(3, 49152, (120,), generator=generator).tolist()
    task = asyncio.create_task(cached.run())
    try:
        await asyncio.wait_for(cached.submit(PrefillRequest(request_id="long", prompt_ids=long, sampling=SamplingParams(),
                                                            target_service_id="t", target_kv_address="")), 30)
    finally:
        task.cancel()
    kept = set(cached.cache.blocks)
    assert len(kept & set(block_keys(long, 4))) == 4 and before <= kept, "a long prompt flushed the shared blocks"
