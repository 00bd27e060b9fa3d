"""A token service's KV room, in process on the tiny model: prompt KV arriving in messages (in
order per layer, a retried prefill rewriting, a gap or another dtype refused), admission by
promised blocks, and blocks coming back exactly once."""

from __future__ import annotations

import asyncio
import http.server
import threading

import numpy as np
import pytest
import torch

from common.errors import KVFull
from common.kv.wire import Header
from common.model import load_model
from common.protocol import ReserveRequest
from common.settings import SettingsError, TokenSettings
from engine.runner import ModelRunner
from token_service.engine import KVMessageError, TokenEngine


@pytest.fixture(scope="module")
def runner(tiny_model_path):
    return ModelRunner(load_model(tiny_model_path), block_size=4)


def engine_of(runner, **settings) -> TokenEngine:
    return TokenEngine(runner, TokenSettings(**{"max_seqs": 4, "max_model_len": 64, "block_size": 4, **settings}), "t")


def receive(engine: TokenEngine, header: Header, payload: np.ndarray) -> None:
    asyncio.run(engine.receive_kv(header, payload))


def message(runner, rid: str, layers: tuple[int, int], tokens: tuple[int, int], dtype=torch.float32):
    kv = runner.kv
    payload = torch.randn(layers[1] - layers[0], 2, tokens[1] - tokens[0], kv.kv_heads, kv.head_dim).to(dtype)
    wire = payload.view(torch.int16) if dtype == torch.bfloat16 else payload
    array = wire.numpy()
    header = Header("kv", rid, 0, *layers, *tokens, dtype=str(dtype).removeprefix("torch."), shape=array.shape,
                    nbytes=array.nbytes)
    return header, array


def test_prompt_kv_in_chunks_a_retry_rewrites_and_a_gap_is_refused(runner):
    engine = engine_of(runner)
    engine.reserve(ReserveRequest(request_id="r", prompt_tokens=10, max_tokens=4))
    seq = engine.scheduler.seqs["r"]
    receive(engine, *message(runner, "r", (0, 3), (0, 6)))     # the first chunk, all 3 layers
    with pytest.raises(KVMessageError, match="gap"):
        receive(engine, *message(runner, "r", (0, 1), (7, 10)))  # token 6 missing
    receive(engine, *message(runner, "r", (0, 1), (0, 10)))    # a retried prefill sends it all again
    assert seq.received == [10, 6, 6] and not seq.kv_ready
    receive(engine, *message(runner, "r", (1, 3), (6, 10)))
    assert seq.kv_ready
    header, payload = message(runner, "r", (0, 3), (0, 10))
    receive(engine, header, payload)
    slots = torch.tensor([b * 4 + i for b in seq.blocks for i in range(4)][:10])
    assert torch.equal(engine.pool[:, :, slots], torch.from_numpy(payload))  # (layers, 2, tokens, heads, D)


def test_a_message_of_another_dtype_or_shape_is_refused(runner):
    engine = engine_of(runner)
    engine.reserve(ReserveRequest(request_id="r", prompt_tokens=8, max_tokens=4))
    with pytest.raises(KVMessageError, match="dtype bfloat16"):
        receive(engine, *message(runner, "r", (0, 3), (0, 8), torch.bfloat16))
    with pytest.raises(KVMessageError, match="does not fit"):
        receive(engine, *message(runner, "r", (0, 3), (0, 9)))  # past the prompt
    assert engine.scheduler.seqs["r"].received == [0, 0, 0]


def test_admission_counts_promised_blocks_and_they_come_back_once(runner):
    engine = engine_of(runner, kv_blocks=10, max_model_len=32)  # 10 blocks of 4 tokens
    engine.reserve(ReserveRequest(request_id="a", prompt_tokens=9, max_tokens=11))  # 20 tokens: 5 blocks promised
    assert (engine.blocks.num_used, engine.blocks.committed) == (3, 5)  # the prompt's taken now
    engine.reserve(ReserveRequest(request_id="b", prompt_tokens=4, max_tokens=16))
    with pytest.raises(KVFull):
        engine.reserve(ReserveRequest(request_id="c", prompt_tokens=1, max_tokens=1))
    assert engine.abort("a") and not engine.abort("a")  # the second finds nothing to free
    assert (engine.blocks.num_used, engine.blocks.committed) == (1, 5)
    engine.reserve(ReserveRequest(request_id="c", prompt_tokens=1, max_tokens=1))
    for rid in ("b", "c"):
        engine.abort(rid)
    assert (engine.blocks.num_used, engine.blocks.committed, len(engine.blocks.free_blocks)) == (0, 0, 10)


def test_a_reservation_whose_abort_overtook_it_is_refused(runner):
    """The gateway gives up a /reserve a hung token service left unanswered, and aborts it; waking
    up, the service may read the abort first. The late call is then refused: it held its room
    until --reservation-ttl-s before. A new call for the same request is not refused, and an abort
    naming another call leaves that one's room alone."""
    import time

    from common.errors import BadRequest

    engine = engine_of(runner, reservation_ttl_s=0.5)
    assert not engine.abort("r", attempt="given-up")  # nothing to free yet
    with pytest.raises(BadRequest, match="aborted before it came"):
        engine.reserve(ReserveRequest(request_id="r", prompt_tokens=8, max_tokens=4, attempt="given-up"))
    assert not engine.scheduler.seqs and engine.blocks.committed == 0
    engine.reserve(ReserveRequest(request_id="r", prompt_tokens=8, max_tokens=4, attempt="next"))
    assert not engine.abort("r", attempt="older")  # another call's abort: this room stays
    assert engine.blocks.committed == 3
    assert engine.abort("r", attempt="next") and engine.blocks.committed == 0
    # remembered only while a reservation would be: then forgotten, the table stays bounded
    time.sleep(0.6)
    engine.expire_reservations()
    engine.reserve(ReserveRequest(request_id="r", prompt_tokens=8, max_tokens=4, attempt="older"))
    assert engine.abort("r") and engine.blocks.committed == 0  # an abort naming no call frees any


def test_an_expired_reservation_is_logged_under_its_id_and_leaves_the_loops_context_alone(runner, caplog_ids):
    """expire_reservations runs in the decode loop's context: the id it logs under was left set
    there, so every later line of the loop (a failed step), and every task the loop started after
    (a replication's failure), named that long-gone reservation."""
    import logging
    import time

    from common.service import request_id_var

    engine = engine_of(runner, reservation_ttl_s=0.05)
    engine.reserve(ReserveRequest(request_id="r-unused", prompt_tokens=8, max_tokens=4))
    time.sleep(0.1)

    async def a_turn_of_the_loop() -> str:
        engine.expire_reservations()
        return request_id_var.get()

    with caplog_ids.at_level(logging.WARNING, logger="token_service.engine"):
        after = asyncio.run(a_turn_of_the_loop())
    [expired] = [r for r in caplog_ids.records if r.getMessage().startswith("reservation unused")]
    assert expired.request_id == "r-unused" and after == "-"
    assert not engine.scheduler.seqs and engine.blocks.committed == 0


def test_a_pool_too_small_for_one_sequence_is_a_settings_error():
    with pytest.raises(SettingsError, match="--kv-blocks"):
        TokenSettings(max_model_len=64, block_size=4, kv_blocks=15)


def test_token_ids_past_the_vocabulary_are_refused_at_the_boundary(runner):
    """A decode step's embedding would fail on them, and a failed decode step takes the service
    (and every stream on it) down: /decode and a colocated /prefill refuse them with a 400."""
    from common.errors import BadRequest
    from common.protocol import DecodeRequest, PrefillRequest, SamplingParams

    engine = engine_of(runner)
    vocab = runner.vocab_size
    engine.reserve(ReserveRequest(request_id="r", prompt_tokens=8, max_tokens=4))
    receive(engine, *message(runner, "r", (0, 3), (0, 8)))
    sampling = SamplingParams(max_tokens=4)
    for first, replay in ((vocab, []), (vocab - 1, [3, vocab + 7])):
        bad = DecodeRequest(request_id="r", first_token=first, replay=replay, sampling=sampling)
        with pytest.raises(BadRequest, match=f"token id {max(replay + [first])} is not in the model's vocabulary"):
            engine.start_decode(bad)
    # ids in the sampling params (a step would index the logits with them), and the penalties' history
    biased = SamplingParams(max_tokens=4, logit_bias=[(vocab, 1.0)])
    penalized = SamplingParams(max_tokens=4, frequency_penalty=1.0)
    for bad, match in ((DecodeRequest(request_id="r", first_token=5, sampling=biased), "logit_bias"),
                       (DecodeRequest(request_id="r", first_token=5, sampling=penalized), "penalties and grammars need the 8 tokens"),
                       (DecodeRequest(request_id="r", first_token=5, sampling=penalized, history=[1] * 7 + [vocab]),
                        "history: token id")):
        with pytest.raises(BadRequest, match=match):
            engine.start_decode(bad)
    assert engine.scheduler.seqs["r"].sampling is None  # nothing changed: a good request still starts
    engine.start_decode(DecodeRequest(request_id="r", first_token=vocab - 1, sampling=sampling))

    engine.reserve(ReserveRequest(request_id="p", prompt_tokens=3, max_tokens=4))
    request = PrefillRequest(request_id="p", prompt_ids=[1, vocab, 2], sampling=sampling, target_service_id="t",
                             target_kv_address="")
    with pytest.raises(BadRequest, match="prompt_ids: token id"):
        asyncio.run(engine.prefill(request))


def test_an_abort_frees_a_running_sequence_at_once_unless_a_step_has_it(runner):
    """A pipeline's head runs microbatches: a running sequence may be in no step when its client
    leaves; its blocks come back at once (they were kept for a step that never came). One in a
    step is freed when the step ends."""
    from common.protocol import DecodeRequest, SamplingParams

    engine = engine_of(runner)
    for rid in ("idle", "stepping"):
        engine.reserve(ReserveRequest(request_id=rid, prompt_tokens=8, max_tokens=4))
        receive(engine, *message(runner, rid, (0, 3), (0, 8)))
        engine.start_decode(DecodeRequest(request_id=rid, first_token=5, sampling=SamplingParams(max_tokens=4)))
    batch = engine.scheduler.schedule()
    assert [s.request_id for s in batch.seqs] == ["idle", "stepping"]  # both running now
    engine.scheduler.seqs["stepping"].stepping = True  # as step() marks the sequences it computes
    engine.abort("idle")
    engine.abort("stepping")
    assert list(engine.scheduler.seqs) == ["stepping"] and engine.blocks.num_used == 2
    seq = engine.scheduler.seqs["stepping"]
    seq.stepping = False
    engine.release(seq)  # what the step's end does with an aborted sequence
    assert engine.blocks.num_used == 0 and engine.blocks.committed == 0


def test_swapping_microbatches_in_one_process_equal_generate(runner, tiny_oracle):
    """--swap on a token service of one process: 6 requests, 3 steps in flight, each within half a
    device of 12 blocks of 4 tokens (2 requests a step), the pool in host memory. The decode loop
    runs them all; every stream equals generate, and the device's room all comes back."""
    from common.protocol import DecodeRequest, SamplingParams
    from engine.attention import Segment
    from token_service.engine import OVERLAPPED
    from token_service.room import kv_room

    block = runner.kv.bytes_per_token * 4
    engine = engine_of(runner, max_seqs=8, max_model_len=24, swap=True, microbatches=3, kv_device_bytes=12 * block)
    assert kv_room(engine.settings, runner) == (8 * 6, 12) and engine.swap.step_blocks == 6
    prompts = [tiny_oracle.tokenizer(t)["input_ids"] for t in
               ["Hi", "The sea", "One two three", "a b c d", "Paris is", "Water boils at"]]
    want = [tiny_oracle.generate_ids(p, 10) for p in prompts]
    overlapped, most = OVERLAPPED._value.get(), []
    schedule = engine.scheduler.schedule

    def watched(*args):  # the blocks of every step the loop schedules
        batch = schedule(*args)
        most.append(sum(-(-(s.input_position + 1) // 4) for s in batch.seqs) if batch else 0)
        return batch

    engine.scheduler.schedule = watched

    async def serve() -> list[list[int]]:
        loop = asyncio.create_task(engine.run())
        streams = []
        for i, ids in enumerate(prompts):
            engine.reserve(ReserveRequest(request_id=f"r{i}", prompt_tokens=len(ids), max_tokens=10))
            seq = engine.scheduler.seqs[f"r{i}"]
            first = runner.forward([Segment(ids, 0, seq.blocks)], engine.pool)  # the prompt's KV, as if streamed in
            seq.mark_all_received(len(ids))
            streams.append(engine.start_decode(DecodeRequest(
                request_id=f"r{i}", first_token=int(first.argmax()), sampling=SamplingParams(max_tokens=10))))
        out = [[s.output[0]] for s in streams]
        for i, seq in enumerate(streams):
            while (event := await asyncio.wait_for(seq.events.get(), 30)).token.finish_reason is None:
                out[i].append(event.token.token_id)
            out[i].append(event.token.token_id)
        loop.cancel()
        return out

    assert asyncio.run(serve()) == want
    assert engine.swap.blocks_used == 0 and engine.blocks.num_used == 0
    assert OVERLAPPED._value.get() > overlapped  # steps in flight at once
    assert max(most) <= 6 and max(most) >= 4  # each within half the device, and filling it


@pytest.mark.asyncio
async def test_a_restore_from_a_hung_store_gives_up_when_its_lease_lapses(runner, redis_server, monkeypatch):
    """Found by killing processes: a cache store SIGSTOPped keeps its sockets open, so a replica's
    fetch from it waited out FETCH_TIMEOUT_S, 30 s of the client's pause, before the re-prefill.
    Now the fetch is dropped once the store's lease is gone from Redis (real Redis here) and it
    does not answer /health: a 503 replica_unavailable, the reservation kept for the prefill that
    follows. A store whose lease a restarted Redis lost, but which answers /health, is waited for."""
    import common.kv.fetch as kv_fetch
    from common import metadata
    from common.errors import Unavailable
    from common.kv import make_transport
    from common.kv.wire import stream_in, stream_out
    from common.protocol import PROTOCOL, RestoreRequest, ServiceInfo, ServiceKind

    monkeypatch.setattr(kv_fetch, "STORE_CHECK_S", 0.1)
    engine = engine_of(runner)
    engine.transport = transport = make_transport("tcp", "secret")
    redis = metadata.connect(redis_server.url)
    engine.registry = registry = metadata.Registry(redis)
    n, gate, health = 6, asyncio.Event(), None
    kv = torch.randn(runner.kv.layers, 2, n, runner.kv.kv_heads, runner.kv.head_dim)

    async def store(conn):  # answers once the test lets it: never, for the hung one
        header, _ = await stream_in(conn)
        await gate.wait()
        await stream_out(conn, kv, request_id=header.request_id, epoch=header.epoch, layer_start=0,
                         layer_end=runner.kv.layers, token_start=0, token_end=n)

    def lease(name: str, address: str) -> ServiceInfo:
        return ServiceInfo(kind=ServiceKind.CACHE_STORE, id=name, url=f"http://{name}", host="h", pid=1,
                           protocol=PROTOCOL, kv_address=address, kv_transport="tcp")

    try:
        address = await transport.listen(store, "127.0.0.1")
        await registry.renew(lease("hung", address), ttl_s=0.5)  # renewed no more: it lapses
        engine.reserve(ReserveRequest(request_id="r", prompt_tokens=8, max_tokens=4))
        held = engine.blocks.num_used
        ask = dict(request_id="r", epoch=1, prompt_ids=list(range(8)), replicated=n, store_kv_address=address)
        with pytest.raises(Unavailable, match="stopped renewing its lease") as info:
            await asyncio.wait_for(engine.restore(RestoreRequest(**ask, store_id="hung")), 10)
        assert info.value.code == "replica_unavailable" and engine.blocks.num_used == held > 0
        assert "r" in engine.scheduler.seqs and not engine.scheduler.seqs["r"].filling  # a prefill may fill it now

        # a lease gone from a Redis that restarted empty, the store alive: its /health answers
        health = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
        threading.Thread(target=health.serve_forever, daemon=True).start()
        asyncio.get_running_loop().call_later(0.5, gate.set)  # five checks of its lease pass first
        alive = RestoreRequest(**ask, store_id="unlisted", store_url=f"http://127.0.0.1:{health.server_address[1]}")
        result = await asyncio.wait_for(engine.restore(alive), 10)
        assert result.fetched == n and Healthy.asked >= 2
        engine.abort("r")
        assert engine.blocks.num_used == 0
    finally:
        if health is not None:
            health.shutdown()
        await redis.aclose()
        await transport.close()


class Healthy(http.server.BaseHTTPRequestHandler):
    """A service's /health, answering 200: a store whose lease Redis lost."""

    asked = 0

    def do_GET(self):  # noqa: N802 - http.server's name
        Healthy.asked += 1
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.asyncio
async def test_a_cancelled_restore_keeps_the_blocks_until_its_fetch_is_over(runner):
    """The gateway gives up on a restore (its call cancelled, twice) and the request is aborted
    meanwhile: the replica's fetch, still under way, writes into the reserved blocks until it ends,
    so they go back to the pool only then (never to another request while it could still land)."""
    from common.kv import make_transport
    from common.kv.wire import stream_in, stream_out
    from common.protocol import RestoreRequest

    engine = engine_of(runner)
    engine.transport = transport = make_transport("tcp", "secret")
    n, gate, asked = 6, asyncio.Event(), asyncio.Event()
    kv = torch.randn(runner.kv.layers, 2, n, runner.kv.kv_heads, runner.kv.head_dim)

    async def slow_store(conn):  # a cache store that holds its answer until the test lets it go
        header, _ = await stream_in(conn)
        asked.set()
        await gate.wait()
        await stream_out(conn, kv, request_id=header.request_id, epoch=header.epoch, layer_start=0,
                         layer_end=runner.kv.layers, token_start=0, token_end=n)

    try:
        address = await transport.listen(slow_store, "127.0.0.1")
        engine.reserve(ReserveRequest(request_id="r", prompt_tokens=8, max_tokens=4))
        held = engine.blocks.num_used
        restore = asyncio.ensure_future(engine.restore(RestoreRequest(
            request_id="r", epoch=1, prompt_ids=list(range(8)), replicated=n, store_id="s", store_kv_address=address)))
        await asyncio.wait_for(asked.wait(), 10)
        engine.abort("r")
        for _ in range(2):
            restore.cancel()
            await asyncio.sleep(0.05)
        assert not restore.done() and held > 0 and engine.blocks.num_used == held  # the fetch's to write still
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(restore, 10)
        assert engine.blocks.num_used == 0 and engine.blocks.committed == 0 and "r" not in engine.scheduler.seqs
    finally:
        await transport.close()


def test_the_old_decode_streams_end_aborts_only_its_own_sequence(runner):
    """A token service that hung and woke may take its request back (gateway/router.py,
    _try_resume): the gateway aborts the old copy, reserves again, and only then may the old decode
    stream's disconnect be seen here. Its end must not abort the new copy under the same id (found
    by a review: the new stream went silent until --token-timeout-s). A reservation while the old
    copy is still ending answers "still ending", room in a moment, not a 400."""
    from common.protocol import DecodeRequest, SamplingParams
    from token_service.app import _events

    engine = engine_of(runner)

    async def main():
        engine.reserve(ReserveRequest(request_id="r", prompt_tokens=4, max_tokens=4))
        old = engine.scheduler.seqs["r"]
        old.mark_all_received(4)
        engine.start_decode(DecodeRequest(request_id="r", epoch=0, first_token=5, first_index=0,
                                          sampling=SamplingParams(max_tokens=4)))
        stream = _events(engine, old)
        pending = asyncio.ensure_future(anext(stream))  # the old stream waits for its next event
        await asyncio.sleep(0)
        old.stepping = True  # in a step: the abort leaves its release to the step's end
        engine.abort("r")  # the gateway's /abort
        with pytest.raises(KVFull, match="still ending"):
            engine.reserve(ReserveRequest(request_id="r", prompt_tokens=4, max_tokens=4))
        old.stepping = False
        engine.release(old)  # the step is over
        engine.reserve(ReserveRequest(request_id="r", prompt_tokens=4, max_tokens=4))  # the resume's room
        new = engine.scheduler.seqs["r"]
        pending.cancel()  # the old connection's disconnect is seen now
        await asyncio.gather(pending, return_exceptions=True)
        await stream.aclose()
        return new

    new = asyncio.run(main())
    assert engine.scheduler.seqs.get("r") is new and not new.done
    engine.abort("r")
    assert engine.blocks.num_used == 0
