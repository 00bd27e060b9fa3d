"""A colocated token service's prefill queue (TokenEngine.prefill), on the tiny model: the first
token equals HF's, also for prompts longer than a step's chunk budget, cut the same way whatever
is queued; a resumed request replays the tokens out in the running batch; and an abort while a
prefill waits or computes frees its blocks exactly once and answers the caller, never leaving it
hanging."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from common.errors import NotFound
from common.model import load_model
from common.protocol import DecodeRequest, PrefillRequest, ReserveRequest, SamplingParams
from common.settings import TokenSettings
from engine.attention import slots_of
from engine.runner import ModelRunner
from token_service.engine import TokenEngine

pytestmark = pytest.mark.asyncio
PROMPTS = [[1, 422, 3003, 314, 2386, 30, 260, 1820], [1, 504, 2156, 28, 3104, 48, 7, 4521]]


@pytest.fixture(scope="module")
def runner(tiny_model_path):
    return ModelRunner(load_model(tiny_model_path))


async def started(runner, chunk: int = 512, cache_mib: int = 0,
                  max_model_len: int = 64) -> tuple[TokenEngine, asyncio.Task]:
    settings = TokenSettings(max_seqs=4, max_model_len=max_model_len, colocated=True, max_batch_tokens=chunk,
                             prefix_cache_mib=cache_mib)
    engine = TokenEngine(runner, settings, "token-test")
    return engine, asyncio.create_task(engine.run())


def prefill(engine: TokenEngine, rid: str, ids: list[int], row: int | None = None, max_tokens: int = 8):
    """Reserve a row of `row` tokens (the prompt's by default) and prefill `ids` into it."""
    engine.reserve(ReserveRequest(request_id=rid, prompt_tokens=row or len(ids), max_tokens=max_tokens))
    req = PrefillRequest(request_id=rid, prompt_ids=ids, sampling=SamplingParams(max_tokens=8),
                         target_service_id="token-test", target_kv_address="")
    return asyncio.ensure_future(engine.prefill(req))


async def test_first_tokens_equal_hf_and_an_abort_while_queued_frees_the_row(runner, tiny_oracle):
    engine, loop = await started(runner)
    try:
        kept, dropped = prefill(engine, "kept", PROMPTS[0]), prefill(engine, "dropped", PROMPTS[1])
        await asyncio.sleep(0)
        assert engine.abort("dropped") and engine.abort("dropped")  # twice: released once
        result = await asyncio.wait_for(kept, 30)
        assert result.first.token_id == tiny_oracle.generate_ids(PROMPTS[0], 1)[0]
        with pytest.raises(NotFound):
            await asyncio.wait_for(dropped, 30)
        assert engine.scheduler.seqs.keys() == {"kept"} and engine.blocks.num_used == 1
        assert engine.scheduler.seqs["kept"].kv_ready
        engine.abort("kept")
        assert engine.blocks.num_used == 0 and engine.blocks.committed == 0
    finally:
        loop.cancel()


async def test_an_abort_during_the_forward_answers_not_found_and_frees_the_row_after_it(runner, monkeypatch):
    engine, loop = await started(runner)
    entered, go, forward = threading.Event(), threading.Event(), runner.forward

    def gated(*args):  # the real forward, held at its start until the test has aborted
        entered.set()
        go.wait(30)
        return forward(*args)

    monkeypatch.setattr(runner, "forward", gated)
    try:
        job = prefill(engine, "r", PROMPTS[1])
        assert await asyncio.to_thread(entered.wait, 30)
        engine.abort("r")
        assert engine.blocks.num_used == 1  # being written: kept until the forward ends
        go.set()
        with pytest.raises(NotFound):
            await asyncio.wait_for(job, 30)
        assert engine.blocks.num_used == 0 and engine.blocks.committed == 0 and not engine.scheduler.seqs
    finally:
        go.set()
        loop.cancel()


async def test_prompts_longer_than_the_budget_are_prefilled_in_chunks(runner, tiny_oracle, monkeypatch):
    """A 16-token budget: the 8-token prompts share one step, a 40-token prompt takes three more,
    and every first token still equals HF's."""
    long = (PROMPTS[0] * 5)[:40]
    sizes, forward = [], runner.forward
    monkeypatch.setattr(runner, "forward", lambda segments, *a: sizes.append([len(s.tokens) for s in segments])
                        or forward(segments, *a))
    engine, loop = await started(runner, chunk=16)
    try:
        jobs = [prefill(engine, "a", PROMPTS[0]), prefill(engine, "b", PROMPTS[1]), prefill(engine, "long", long)]
        results = await asyncio.wait_for(asyncio.gather(*jobs), 30)
        assert [r.first.token_id for r in results] == [tiny_oracle.generate_ids(p, 1)[0] for p in (*PROMPTS, long)]
        assert sizes == [[8, 8], [16], [16], [8]]
    finally:
        loop.cancel()


async def test_a_prompts_chunks_and_kv_are_the_same_whatever_is_queued_before_it(runner, monkeypatch):
    """A prompt's chunks are tokens [0, 16), [16, 32), ... whether it is queued alone or behind
    another prompt that leaves part of a step's budget: so its KV is the same to the bit, and a
    re-prefill after a failover (issue #10) computes exactly the KV of the first prefill."""
    long = (PROMPTS[1] * 3)[:20]
    sizes, forward = [], runner.forward
    monkeypatch.setattr(runner, "forward", lambda segments, *a: sizes.append([len(s.tokens) for s in segments])
                        or forward(segments, *a))
    engine, loop = await started(runner, chunk=16)
    try:
        await asyncio.wait_for(prefill(engine, "alone", long), 30)
        queued = [prefill(engine, "first", PROMPTS[0]), prefill(engine, "behind", long)]
        await asyncio.wait_for(asyncio.gather(*queued), 30)
        assert sizes == [[16], [4], [8], [16], [4]]  # not [8, 8], [12]: "behind" waits for a whole chunk
        alone, behind = (engine.scheduler.seqs[rid].blocks for rid in ("alone", "behind"))
        kv = [engine.pool[:, :, slots_of(blocks, engine.blocks.block_size, 0, len(long))] for blocks in (alone, behind)]
        assert torch.equal(*kv)
    finally:
        loop.cancel()


async def test_a_resumed_request_replays_the_tokens_out_in_the_running_batch(runner, monkeypatch):
    """A re-prefill resume (issue #10): the row is the prompt plus 5 tokens out, the prefill brings
    the prompt's KV, and the decode feeds the 5 tokens first, one per step, next to a request that
    goes on decoding; each gives a keep-alive (None) on the stream, none a token; then it samples
    output index 6 on."""
    positions, forward = [], runner.forward
    monkeypatch.setattr(runner, "forward", lambda segments, *a: positions.append([s.start for s in segments])
                        or forward(segments, *a))
    engine, loop = await started(runner)
    try:
        first = await asyncio.wait_for(prefill(engine, "a", PROMPTS[0], max_tokens=40), 30)
        engine.start_decode(DecodeRequest(request_id="a", first_token=first.first.token_id,
                                          sampling=SamplingParams(max_tokens=40, ignore_eos=True)))
        out = [11, 12, 13, 14, 15, 16]  # output tokens 0-5 of "b", out[-1] the next input
        await asyncio.wait_for(prefill(engine, "b", PROMPTS[1], row=len(PROMPTS[1]) + 5), 30)
        seq = engine.start_decode(DecodeRequest(request_id="b", replay=out[:5], first_token=out[5], first_index=5,
                                                sampling=SamplingParams(max_tokens=8, ignore_eos=True)))
        events = [await asyncio.wait_for(seq.events.get(), 30) for _ in range(7)]
        assert events[:5] == [None] * 5 and [e.token.index for e in events[5:]] == [6, 7]
        row = range(len(PROMPTS[1]), len(PROMPTS[1]) + 5)  # the positions of the tokens replayed
        assert [p[1] for p in positions if len(p) == 2 and p[1] in row] == list(row)  # one per step, with "a"
    finally:
        loop.cancel()


async def test_a_decoding_request_aborted_during_another_prefill_is_released(runner, monkeypatch):
    """Issue #10, defect 8: request "a" decodes while "long" is prefilled chunk by chunk; "a" is
    aborted while a forward holding both runs. Its blocks must come back after that step, not
    never (a leak that, max_seqs times over, leaves a service refusing everything)."""
    engine, loop = await started(runner, chunk=16)
    entered, go, forward = threading.Event(), threading.Event(), runner.forward
    gate = {"on": False}

    def gated(segments, *args):  # the real forward; held once a step has a decode and a prompt chunk
        if gate["on"] and len(segments) > 1:
            gate["on"] = False
            entered.set()
            go.wait(30)
        return forward(segments, *args)

    monkeypatch.setattr(runner, "forward", gated)
    try:
        first = await asyncio.wait_for(prefill(engine, "a", PROMPTS[0]), 30)
        engine.start_decode(DecodeRequest(request_id="a", first_token=first.first.token_id,
                                          sampling=SamplingParams(max_tokens=8, ignore_eos=True)))
        gate["on"] = True
        job = prefill(engine, "long", (PROMPTS[1] * 6)[:48])  # three chunks of 16
        assert await asyncio.to_thread(entered.wait, 30)
        assert engine.abort("a")
        go.set()
        await asyncio.wait_for(job, 30)
        assert engine.scheduler.seqs.keys() == {"long"}
        engine.abort("long")
        assert engine.blocks.num_used == 0 and engine.blocks.committed == 0 and not engine.scheduler.seqs
    finally:
        go.set()
        loop.cancel()


async def test_a_prompt_sharing_a_prefix_computes_only_the_rest_and_gets_the_same_first_token(
        runner, tiny_oracle, monkeypatch):
    """Prefix cache on (16-token blocks and chunks): "a" is prefilled in chunks, and its two whole
    blocks are kept as its chunks complete them. "b", queued behind it and sharing those blocks,
    looks them up anew at each step until it starts: in the step of a's last chunk it finds both
    and computes its own 9 tokens only, after it. The bits of the shared blocks are a's, and all
    of its KV is what a service without a cache computes; both first tokens equal HF's. Later "b"
    again reuses its own blocks; "c", echo with logprobs, scores every token, so reuses nothing,
    but what such a prompt ("d") computes is kept for the next ("e"). Every block comes back."""
    from engine.prefix_cache import HIT_TOKENS

    generator = torch.Generator().manual_seed(7)
    a = torch.randint(3, 49152, (40,), generator=generator).tolist()
    b = a[:32] + torch.randint(3, 49152, (9,), generator=generator).tolist()
    sizes, forward, forward_scored = [], runner.forward, runner.forward_scored
    monkeypatch.setattr(runner, "forward", lambda segments, *args: sizes.append(
        [(s.start, len(s.tokens)) for s in segments]) or forward(segments, *args))
    monkeypatch.setattr(runner, "forward_scored", lambda segments, *args: sizes.append(
        [(s.start, len(s.tokens)) for s in segments]) or forward_scored(segments, *args))
    engine, loop = await started(runner, chunk=16, cache_mib=16)
    plain, plain_loop = await started(runner, chunk=16)
    try:
        before = HIT_TOKENS._value.get()
        results = await asyncio.wait_for(asyncio.gather(prefill(engine, "a", a), prefill(engine, "b", b)), 30)
        assert [r.first.token_id for r in results] == [tiny_oracle.generate_ids(p, 1)[0] for p in (a, b)]
        assert sizes == [[(0, 16)], [(16, 16)], [(32, 8)], [(32, 9)]]  # b's 9 did not fit beside a's last 8
        assert HIT_TOKENS._value.get() - before == 32 and [r.first.cached_tokens for r in results] == [0, 32]
        assert engine.prefills.cache.bytes == 2 * engine.block_bytes  # a's two whole blocks (b's third is partial)

        def kv(e: TokenEngine, rid: str, n: int) -> torch.Tensor:
            return e.pool[:, :, slots_of(e.scheduler.seqs[rid].blocks, e.blocks.block_size, 0, n)]

        assert torch.equal(kv(engine, "b", 32), kv(engine, "a", 32))  # a's bits
        await asyncio.wait_for(prefill(plain, "b", b), 30)
        assert torch.equal(kv(engine, "b", 41), kv(plain, "b", 41))  # to the bit (prefix_cache.MIN_COMPUTED)

        sizes.clear()
        again = await asyncio.wait_for(prefill(engine, "b-again", b), 30)
        assert again.first.token_id == results[1].first.token_id and sizes == [[(32, 9)]]
        sizes.clear()
        engine.reserve(ReserveRequest(request_id="c", prompt_tokens=len(a), max_tokens=8))
        scored = await asyncio.wait_for(engine.prefill(PrefillRequest(
            request_id="c", prompt_ids=a, sampling=SamplingParams(max_tokens=8), prompt_logprobs=0,
            target_service_id="token-test", target_kv_address="")), 30)
        assert len(scored.first.prompt_logprobs) == len(a) - 1 and [s[0] for s in sizes] == [(0, 16), (16, 16), (32, 8)]
        assert HIT_TOKENS._value.get() - before == 64 and scored.first.cached_tokens == 0
        # a prompt scored looks nothing up, but the blocks it computes are kept for the next one
        engine.abort("b-again")
        engine.abort("c")
        d = torch.randint(3, 49152, (40,), generator=generator).tolist()
        engine.reserve(ReserveRequest(request_id="d", prompt_tokens=len(d), max_tokens=8))
        await asyncio.wait_for(engine.prefill(PrefillRequest(
            request_id="d", prompt_ids=d, sampling=SamplingParams(max_tokens=8), prompt_logprobs=0,
            target_service_id="token-test", target_kv_address="")), 30)
        after_d = await asyncio.wait_for(prefill(engine, "e", d[:32] + [5, 6, 7]), 30)
        assert after_d.first.cached_tokens == 32
        for rid in ("a", "b", "d", "e"):
            engine.abort(rid)
        plain.abort("b")
        assert engine.blocks.num_used == plain.blocks.num_used == 0 and not engine.scheduler.seqs
    finally:
        loop.cancel()
        plain_loop.cancel()


async def test_a_hit_off_the_chunk_grid_gives_the_kv_and_first_token_of_a_prefill_without_the_cache(runner):
    """Chunks of 64, blocks of 16: "b" shares 3 blocks with "a", so it computes [48, 78) where a
    service without the cache computes [0, 64) and [64, 78). The KV is the same to the bit (on
    CPU; README: on CUDA attention over another split may round otherwise), so a re-prefill after
    a failover, which another service computes with or without a hit of its own, gets the KV its
    first prefill had."""
    generator = torch.Generator().manual_seed(11)
    a = torch.randint(3, 49152, (100,), generator=generator).tolist()
    b = a[:48] + torch.randint(3, 49152, (30,), generator=generator).tolist()
    engine, loop = await started(runner, chunk=64, cache_mib=16, max_model_len=128)
    plain, plain_loop = await started(runner, chunk=64, max_model_len=128)
    try:
        await asyncio.wait_for(prefill(engine, "a", a), 30)
        hit = await asyncio.wait_for(prefill(engine, "b", b), 30)
        whole = await asyncio.wait_for(prefill(plain, "b", b), 30)
        assert hit.first.cached_tokens == 48 and hit.first.token_id == whole.first.token_id
        kv = [e.pool[:, :, slots_of(e.scheduler.seqs["b"].blocks, 16, 0, len(b))] for e in (engine, plain)]
        assert torch.equal(*kv)
    finally:
        loop.cancel()
        plain_loop.cancel()
