"""Prefix caching on a prompt service (prompt_service/prefix_cache.py): blocks found only behind
the same prefix, least recently used out first (a chain's tail before its head), and a prompt that
hits sends the token service the same KV and the same first token as one computed whole."""

from __future__ import annotations

import asyncio

import pytest
import torch

from common.protocol import PrefillRequest, SamplingParams
from common.settings import PromptSettings
from prompt_service.prefix_cache import PrefixCache, block_keys

pytestmark = pytest.mark.asyncio
SHAPE = (3, 2, 4, 2, 16)  # (layers, 2, block_size, kv_heads, head_dim)


def kv(i: int) -> torch.Tensor:
    return torch.full(SHAPE, float(i))


async def test_blocks_are_found_behind_the_same_prefix_only_and_the_tail_goes_first():
    cache = PrefixCache(capacity_bytes=4 * kv(0).nbytes, block_size=4)
    a = list(range(1, 14))                      # 3 whole blocks and a token
    keys, hit = cache.lookup(a)
    assert len(keys) == 3 and hit == []
    cache.insert(keys, {i: kv(i) for i in range(3)})
    assert [int(b[0, 0, 0, 0, 0]) for b in cache.lookup(a)[1]] == [0, 1, 2]
    assert len(cache.lookup(a[:12])[1]) == 2     # the last token is computed: block 2 is not a hit here
    assert len(cache.lookup(a[:4] + [99] + a[5:])[1]) == 1  # block 1 differs: nothing behind it is reused
    assert block_keys([9] + a[1:], 4)[1] != keys[1]  # the same tokens behind another prefix: another key
    b = [50] * 9
    cache.insert(block_keys(b, 4), {0: kv(10), 1: kv(11)})  # 5 blocks > 4: a's tail (least recently used) goes
    assert len(cache.blocks) == 4 and cache.bytes == 4 * kv(0).nbytes
    assert len(cache.lookup(a)[1]) == 2 and len(cache.lookup(b)[1]) == 2
    cache.insert(block_keys(list(range(100, 120)), 4), {i: kv(i) for i in range(5)})  # 5 blocks: 4 kept, head first
    assert len(cache.lookup(list(range(100, 121)))[1]) == 4 and not cache.lookup(a)[1]


async def test_a_prompt_that_hits_gets_the_kv_and_first_token_of_one_computed_whole(tiny_model_path, monkeypatch):
    """Prompt A, then B sharing A's first 6 blocks and its own rest: B computes only the rest (the
    prefix's KV sent first, from the cache), and what the token service receives for B is what a
    service without a cache sends, token for token and layer for layer; so is its first token."""
    import prompt_service.engine as prompt_engine
    from common.model import load_model
    from engine.runner import ModelRunner
    from prompt_service.prefix_cache import HIT_TOKENS
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

    async def prefill(engine, rid: str, ids: list[int]):
        req = PrefillRequest(request_id=rid, prompt_ids=ids, sampling=SamplingParams(temperature=0),
                             target_service_id="t", target_kv_address="")
        task = asyncio.create_task(engine.run())
        try:
            first = (await asyncio.wait_for(engine.submit(req), 30)).first.token_id
            while engine.cache and engine.cache.missing(block_keys(ids, 4)):  # kept after the answer
                await asyncio.sleep(0.01)
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
    torch.testing.assert_close(received("b", 33), received("b-whole", 33), rtol=1e-5, atol=1e-5)
    # the same prompt again: all of it but its last block from the cache (a token is always computed)
    again = await prefill(cached, "b-again", b)
    assert again == first and HIT_TOKENS._value.get() - before == 24 + 32
    twice, once = received("b-again", 33), received("b", 33)
    assert torch.equal(twice[:, :, :32], once[:, :, :32])  # the bits b's prefill computed, as they were
    torch.testing.assert_close(twice, once, rtol=1e-5, atol=1e-5)
    assert not cached.jobs and not plain.jobs
