"""The links of a token pipeline (token_service/pipeline.py), in process over a real TCP transport
on the tiny model: frames round-trip; a head and a stage set up, then prompts and decode steps
through both equal one whole model, KV sent on for the stage's layers lands in its pool; a stage
that does not fit the head refuses the setup; a stage that goes away breaks the pipeline at once."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from cache_store.app import _layers
from cache_store.store import Refused, ReplicaStore
from common import metadata
from common.kv import make_transport
from common.kv.receiver import kv_server
from common.protocol import ServiceInfo, ServiceKind
from common.kv.transport import TransportError
from engine.attention import Segment
from engine.runner import ModelRunner, stage_layers
from engine.swap import SwapPool
from token_service.pipeline import Pipeline, PipelineError, StageInfo, decode, encode
from token_service.stage import Stage

pytestmark = pytest.mark.asyncio
BLOCK, BLOCKS = 4, 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
async def test_frames_round_trip(dtype):
    t = torch.randn(5, 3).to(dtype)
    for meta in (None, {"blocks": [1, 2, 3]}, "x" * 17):  # 17: the tensor starts past padding
        raw, payload = encode({"op": "step", "step": 4}, meta, t)
        header, got_meta, got = decode(raw, payload.copy())
        assert header["op"] == "step" and header["step"] == 4 and got_meta == meta
        assert got.dtype == dtype and torch.equal(got, t)


def setup_of(runner: ModelRunner, stages: int, **changes) -> dict:
    return {"pipeline": "p", "model_id": "m", "dtype": runner.dtype_name, "block_size": BLOCK, "num_blocks": BLOCKS,
            "stages": stages, "device_blocks": 0, **changes}


async def linked(model, stages: int = 2, stage_blocks: dict[int, int] | None = None, device_blocks: int = 0,
                 **changes):
    """Stages 1.. of `stages` listening on TCP (stage k with stage_blocks.get(k, BLOCKS) blocks, and
    with device_blocks, swapping) and a head's Pipeline ready to set them up."""
    layers = [stage_layers(model.config.num_hidden_layers, stages, k) for k in range(stages)]
    head = ModelRunner(model, block_size=BLOCK, layers=layers[0])
    stage_transports, head_transport = [make_transport("tcp", "secret") for _ in range(1, stages)], make_transport("tcp", "secret")
    workers, infos = [], [StageInfo(0, "", layers[0])]
    for k, transport in zip(range(1, stages), stage_transports):
        worker = Stage(ModelRunner(model, block_size=BLOCK, layers=layers[k]), (stage_blocks or {}).get(k, BLOCKS),
                       k, stages, "m", transport, device_blocks)
        infos.append(StageInfo(k, await transport.listen(worker.handle, "127.0.0.1"), layers[k]))
        workers.append(worker)
    broken = []
    pipeline = Pipeline(head_transport, head, infos, on_broken=lambda: broken.append(True))
    return head, workers, pipeline, broken, stage_transports + [head_transport], setup_of(head, stages, **changes)


async def test_a_head_and_a_stage_compute_what_one_model_does(tiny_oracle):
    model = tiny_oracle.model
    head, (stage,), pipeline, broken, transports, setup = await linked(model)
    try:
        await pipeline.open(setup)
        whole = ModelRunner(model, block_size=BLOCK)
        whole_pool, head_pool = whole.new_pool(BLOCKS), head.new_pool(BLOCKS)
        prompts = [tiny_oracle.tokenizer(t)["input_ids"] for t in ["Hi there", "The capital of France is"]]
        tables = [[3, 9, 1], [0, 7, 12, 5]]

        async def both(segments):
            want = whole.forward(segments, whole_pool)
            got = await pipeline.forward(segments, head.forward(segments, head_pool))
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            return want.argmax(-1).tolist()

        last = await both([Segment(p, 0, t) for p, t in zip(prompts, tables)])
        for _ in range(4):  # two microbatches in flight at once: one sequence each
            segments = [Segment([tok], len(p), t) for tok, p, t in zip(last, prompts, tables)]
            want = whole.forward(segments, whole_pool)
            hidden = [head.forward([s], head_pool) for s in segments]
            got = await asyncio.gather(*(pipeline.forward([s], h) for s, h in zip(segments, hidden)))
            torch.testing.assert_close(torch.cat(got), want, rtol=0, atol=0)
            last = want.argmax(-1).tolist()
            prompts = [p + [tok] for p, tok in zip(prompts, last)]
        assert stage.steps == 9

        # KV that a prompt service streams for a new sequence: the head's layers land in its pool, the
        # stage's go down the link, ahead of the sequence's first step (which reads them there)
        kv = torch.randn(whole.kv.layers, 2, 5, whole.kv.kv_heads, whole.kv.head_dim)
        table, slots = [20, 21], torch.tensor([80, 81, 82, 83, 84])
        whole_pool[:, :, slots], head_pool[:, :, slots] = kv, kv[: len(head.layers)]
        await pipeline.send_kv(table, range(len(head.layers), whole.kv.layers), range(0, 5), kv[len(head.layers):])
        segment = [Segment([1], 5, table)]
        got = await pipeline.forward(segment, head.forward(segment, head_pool))
        torch.testing.assert_close(got, whole.forward(segment, whole_pool), rtol=0, atol=0)
        assert torch.equal(stage.pool[:, :, slots], kv[len(head.layers):])
        assert not broken
    finally:
        await pipeline.close()
        for t in transports:
            await t.close()


@pytest.mark.parametrize("wrong", [{"num_blocks": BLOCKS + 1}, {"model_id": "other"}, {"dtype": "bfloat16"}])
async def test_a_stage_that_does_not_fit_refuses_the_setup(tiny_oracle, wrong):
    _, (stage,), pipeline, _, transports, setup = await linked(tiny_oracle.model, **wrong)
    try:
        with pytest.raises(PipelineError, match="is not this stage's"):
            await pipeline.open(setup)
        assert not stage.linked
    finally:
        await pipeline.close()
        for t in transports:
            await t.close()


async def test_a_stage_in_the_middle_that_refuses_says_why_at_once(tiny_oracle):
    """Stage 1 of 3 has another pool size: it has no results link to the head, so it answers up
    the chain; the head hears why at once, not after the setup's timeout."""
    _, workers, pipeline, _, transports, setup = await linked(tiny_oracle.model, stages=3, stage_blocks={1: BLOCKS * 2})
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(PipelineError, match="stage 1: the head's .* is not this stage's"):
            await pipeline.open(setup)
        assert asyncio.get_running_loop().time() - started < 10 and not any(w.linked for w in workers)
    finally:
        await pipeline.close()
        for t in transports:
            await t.close()


async def test_a_stage_that_goes_away_breaks_the_pipeline(tiny_oracle):
    head, _, pipeline, broken, (stage_transport, head_transport), setup = await linked(tiny_oracle.model)
    try:
        await pipeline.open(setup)
        await stage_transport.close()
        for _ in range(100):
            if broken:
                break
            await asyncio.sleep(0.05)
        assert broken == [True]
        with pytest.raises(TransportError):
            await pipeline.forward([Segment([1], 0, [0])], head.forward([Segment([1], 0, [0])], head.new_pool(BLOCKS)))
    finally:
        await pipeline.close()
        await head_transport.close()


async def test_a_stage_that_hangs_ends_the_pipeline_once_its_lease_is_gone(tiny_oracle, redis_server, monkeypatch):
    """Found by stopping processes: a SIGSTOPped stage keeps its links open, and a step waited
    STEP_TIMEOUT_S, 60 s, for it (a prefill's too, with another pipeline idle). The head watches its
    stages' leases now: a stage whose lease is gone and whose /health does not answer ends the
    pipeline. A slow step of a stage still leased comes back, and so does one of a stage whose lease
    is gone but that answers /health (a Redis that restarted empty)."""
    import dataclasses
    import http.server
    import socket
    import threading

    import token_service.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "STAGE_CHECK_S", 0.2)
    head, (stage,), pipeline, broken, transports, setup = await linked(tiny_oracle.model)

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    healthy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=healthy.serve_forever, daemon=True).start()
    hung = socket.create_server(("127.0.0.1", 0))  # connects (the kernel's backlog), never answers
    urls = {"answers": f"http://127.0.0.1:{healthy.server_port}", "hung": f"http://127.0.0.1:{hung.getsockname()[1]}"}
    registry = metadata.Registry(metadata.connect(redis_server.url))
    lease = ServiceInfo(kind=ServiceKind.STAGE, id="stage-hangs-1", url=urls["hung"], host="127.0.0.1", pid=1)
    delay = {"s": 0.0}
    compute = stage.runner.run

    async def slow(fn, *args):
        await asyncio.sleep(delay["s"])
        return await compute(fn, *args)

    stage.runner.run = slow
    pool, segment = head.new_pool(BLOCKS), [Segment([1, 2, 3], 0, [0])]
    try:
        await pipeline.open(setup)
        pipeline.watch_leases(registry)
        for leased, health, wait in ((True, "hung", 1.0), (False, "answers", 1.0), (False, "hung", 3600.0)):
            pipeline.stages[1] = dataclasses.replace(pipeline.stages[1], service_id=lease.id, url=urls[health])
            if leased:
                await registry.renew(lease, ttl_s=60)
            else:
                await registry.deregister(lease.id)
            delay["s"] = wait
            step = pipeline.forward(segment, head.forward(segment, pool))
            if wait < 60:
                assert (await step).shape[0] == 1 and not broken, (leased, health)
                continue
            with pytest.raises(TransportError, match="stage 1 .* stopped renewing its lease and does not answer"):
                await asyncio.wait_for(step, 30)  # well before STEP_TIMEOUT_S
        assert broken == [True]
    finally:
        await pipeline.close()  # the registry's connection with it
        await stage.close()
        for t in transports:
            await t.close()
        healthy.shutdown()
        hung.close()


async def test_a_stage_silent_past_a_fetch_bound_breaks_the_pipeline_quietly(tiny_oracle, monkeypatch):
    """A stage whose store never answers its fetch: the head gives up at its bound and the pipeline
    breaks (the stage's write could still land in blocks that go to another request); the report's
    future is not left holding an exception no one retrieves (asyncio logs those when collected)."""
    import token_service.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "FETCH_TIMEOUT_S", 0.2)
    monkeypatch.setattr(pipeline_module, "STAGE_MARGIN_S", 0.1)
    head, (stage,), pipeline, broken, transports, setup = await linked(tiny_oracle.model)
    silent = make_transport("tcp", "secret")
    loop, futures = asyncio.get_running_loop(), []

    def create_future():
        futures.append(asyncio.Future(loop=loop))
        return futures[-1]

    async def never_answers(conn):
        await asyncio.Event().wait()

    try:
        await pipeline.open(setup)
        address = await silent.listen(never_answers, "127.0.0.1")
        monkeypatch.setattr(loop, "create_future", create_future)
        with pytest.raises(TransportError, match="fetch .*: not every stage reported in 0 s"):
            await pipeline.fetch("r1", 1, [0, 1], 5, address)
        monkeypatch.undo()
        report = futures[0]  # the first future the fetch made: its reports' (then sockets' and tasks')
        assert broken == [True] and not pipeline.reports
        assert report.done() and not report._log_traceback  # nothing for asyncio to log
    finally:
        await pipeline.close()
        await stage.close()
        for t in [*transports, silent]:
            await t.close()


async def test_a_stage_drops_its_fetch_from_a_hung_store_once_its_lease_is_gone(tiny_oracle, redis_server,
                                                                                  monkeypatch):
    """A restore through a pipeline whose replica's store is SIGSTOPped (its sockets open): each
    stage drops its fetch once the store's lease is gone from Redis (real Redis here) and it does
    not answer /health, and reports that, so the gateway prefills again after about a lease TTL,
    not after the fetch's 30 s (a left-alone item of stop 52). The pipeline stays up."""
    import socket

    import common.kv.fetch as kv_fetch

    monkeypatch.setattr(kv_fetch, "STORE_CHECK_S", 0.1)
    head, (stage,), pipeline, broken, transports, setup = await linked(tiny_oracle.model)
    hung_store, redis = make_transport("tcp", "secret"), metadata.connect(redis_server.url)
    stage.registry = registry = metadata.Registry(redis)
    with socket.socket() as probe:  # a port nothing listens on: its /health is refused
        probe.bind(("127.0.0.1", 0))
        no_health = f"http://127.0.0.1:{probe.getsockname()[1]}"

    async def never_answers(conn):
        await asyncio.Event().wait()

    try:
        await pipeline.open(setup)
        address = await hung_store.listen(never_answers, "127.0.0.1")
        await registry.renew(ServiceInfo(kind=ServiceKind.CACHE_STORE, id="store-hung", url=no_health, host="h",
                                         pid=1, kv_address=address, kv_transport="tcp"), ttl_s=0.5)  # lapses
        with pytest.raises(PipelineError, match="stage 1: StoreGone: the store store-hung stopped renewing its lease"):
            await asyncio.wait_for(pipeline.fetch("r1", 1, [0, 1], 5, address, "store-hung", no_health), 20)
        assert not broken and not pipeline.reports
    finally:
        await pipeline.close()
        await stage.close()
        await redis.aclose()
        for t in [*transports, hung_store]:
            await t.close()


async def test_three_stages_swapping_compute_what_one_model_does(tiny_oracle, monkeypatch, redis_server):
    """--swap on every stage: each computes over a device of 12 blocks, the KV of record in its host
    pool. Two microbatches in flight; KV sent on for a new sequence right behind a step that is
    still computing, and that sequence's first step right behind it (a stage must apply the KV
    before it swaps the step in). All equal one model. Then each stage replicates its layers of a
    sequence to a real cache store and records them in a real Redis: the store holds what the
    steps wrote, and Redis the index once every layer is in (the head's own part recorded last);
    and each stage fetches its layers of it back, as a restore on a pipeline does."""
    model = tiny_oracle.model
    head, workers, pipeline, broken, transports, setup = await linked(model, stages=3, device_blocks=12)
    setup["device_blocks"] = 12
    swap = SwapPool(head, BLOCKS, 12)
    try:
        await pipeline.open(setup)
        whole = ModelRunner(model, block_size=BLOCK)
        whole_pool = whole.new_pool(BLOCKS)
        prompts = [tiny_oracle.tokenizer(t)["input_ids"] for t in ["Hi there", "The capital of France is"]]
        tables = [[3, 9, 1], [0, 7, 12, 5], [30, 2, 4]]

        async def step(segments, staged):
            return await pipeline.forward(segments, await asyncio.to_thread(swap.forward, head, staged))

        segments = [Segment(p, 0, t) for p, t in zip(prompts[:2], tables[:2])]
        got = await step(segments, swap.prefetch(segments))
        want = whole.forward(segments, whole_pool)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        last = want.argmax(-1).tolist()
        for _ in range(3):  # two microbatches in flight, the second swapping in while the first computes
            segments = [Segment([tok], len(p), t) for tok, p, t in zip(last, prompts, tables)]
            staged = [swap.prefetch([s]) for s in segments]
            got = await asyncio.gather(*(step([s], st) for s, st in zip(segments, staged)))
            want = whole.forward(segments, whole_pool)
            torch.testing.assert_close(torch.cat(got), want, rtol=0, atol=0)
            last = want.argmax(-1).tolist()
            prompts = [p + [tok] for p, tok in zip(prompts, last)]

        kv = torch.randn(whole.kv.layers, 2, 5, whole.kv.kv_heads, whole.kv.head_dim)
        slots = torch.tensor([30 * BLOCK + i for i in range(BLOCK)] + [2 * BLOCK])
        whole_pool[:, :, slots], swap.host[:, :, slots] = kv, kv[: len(head.layers)]
        busy = [Segment([tok], len(p), t) for tok, p, t in zip(last, prompts[:2], tables[:2])]
        computes, held_back = workers[0].swap.forward, []

        def slowly(*args):  # stage 1 takes its time over this step, so that the next frames queue behind it
            time.sleep(0.3)
            return computes(*args)

        def read(self, link, raw, payload):
            Stage._read_frame(self, link, raw, payload)
            frame = link.frames._queue[-1]
            held_back.extend([self.stage] if frame.header["op"] == "step" and frame.lags else [])

        monkeypatch.setattr(workers[0].swap, "forward", slowly)
        monkeypatch.setattr(workers[0], "_read_frame", read.__get__(workers[0]))
        hidden = await asyncio.to_thread(swap.forward, head, swap.prefetch(busy))
        first = asyncio.ensure_future(pipeline.forward(busy, hidden))  # computing on the stages ...
        await asyncio.sleep(0)
        await pipeline.send_kv(tables[2], range(len(head.layers), whole.kv.layers), range(0, 5), kv[len(head.layers):])
        new = [Segment([7], 5, tables[2])]
        second = asyncio.ensure_future(step(new, swap.prefetch(new)))  # ... while these frames queue behind it
        got = await asyncio.gather(first, second)
        torch.testing.assert_close(got[0], whole.forward(busy, whole_pool), rtol=0, atol=0)
        torch.testing.assert_close(got[1], whole.forward(new, whole_pool), rtol=0, atol=0)
        assert held_back == [1]  # its prefetch waited for the KV ahead of it

        store, redis = ReplicaStore(), metadata.connect(redis_server.url)
        transports.append(store_transport := make_transport("tcp", "secret"))
        fetch = lambda h: store.fetch(h.request_id, h.epoch, h.token_end, _layers(h))  # noqa: E731 - as the app wires it
        address = await store_transport.listen(kv_server(store.put, (Refused,), fetch=fetch), "127.0.0.1")
        requests = metadata.RequestStore(redis)
        for w in workers:
            w.requests = requests
        rid, n, later = f"r-{time.time_ns()}", len(prompts[1]) + 1, range(len(head.layers), whole.kv.layers)
        await requests.create(rid, {"status": "running"})
        info = ServiceInfo(kind=ServiceKind.CACHE_STORE, id="store-0", url="", host="", pid=0, kv_address=address)
        reports = await pipeline.replicate(rid, 0, 0, tables[1], range(0, n), info, whole.kv.layers)
        assert sorted(r["stage"] for r in reports) == [1, 2] and not any(r.get("error") for r in reports), reports
        want = whole_pool[:, :, torch.cat([torch.arange(b * BLOCK, b * BLOCK + BLOCK) for b in tables[1]])][:, :, :n]
        assert torch.equal(torch.from_numpy(store.fetch(rid, 0, n, later)[0]), want[later.start:])
        assert (await requests.get(rid))["replicated"] == "0"  # layer 0, the head's, is not in yet
        assert await requests.advance_replicated(rid, 0, n, "store-0", head.layers, whole.kv.layers) == n

        # a restore on this pipeline: each stage fetches its own layers into the blocks named (a new
        # owner's, at a newer epoch), as the head does its own; none of their KV passes through the head
        fresh = [20, 21, 22, 23][: -(-n // BLOCK)]
        slots = torch.cat([torch.arange(b * BLOCK, b * BLOCK + BLOCK) for b in fresh])[:n]
        await pipeline.fetch(rid, 1, fresh, n, address)
        for w in workers:
            assert torch.equal(w.swap.host[:, :, slots], want[w.runner.layers.start: w.runner.layers.stop])
        with pytest.raises(PipelineError, match=r"stage 1: FetchError: .*; stage 2: FetchError: "):
            await pipeline.fetch(rid, 1, fresh, n + 1, address)  # more than the replica has: each stage says so
        with pytest.raises(PipelineError, match=r"stage 1: FetchError: .*fenced: .*epoch 0 is older"):
            await pipeline.fetch(rid, 0, fresh, n, address)  # the fenced owner's epoch
        assert not broken and swap.blocks_used == 0 and all(w.swap.blocks_used == 0 for w in workers)
        await redis.aclose()
    finally:
        await pipeline.close()
        for w in workers:
            await w.close()
        for t in transports:
            await t.close()


async def test_prompt_kv_straight_to_a_stage(tiny_oracle, monkeypatch):
    """A prompt service's KV for stage 1's layers, sent to stage 1's own address: it waits for the
    head's reserve frame if it comes first, lands in the prompt's blocks and is acknowledged; the
    head's landed query counts it; layers of another stage, a gap, an unknown or released request
    are refused with an error frame, and the link stays up."""
    import token_service.stage as pipeline_module
    from common.kv.peers import KVRejected, Peers

    monkeypatch.setattr(pipeline_module, "KV_WAIT_S", 1.0)
    head, (stage,), pipeline, broken, transports, setup = await linked(tiny_oracle.model, stages=2)
    prompt_transport = make_transport("tcp", "secret")
    peers = Peers(prompt_transport)
    try:
        await pipeline.open(setup)
        (address, start, stop), = pipeline.kv_routes
        assert (start, stop) == (stage.runner.layers.start, stage.runner.layers.stop) == (2, 3)
        link = await peers.get(address)
        kv = head.kv
        slab = torch.randn(1, 2, 6, kv.kv_heads, kv.head_dim)
        blocks = [5, 9, 11]

        async def send(rid, data, layers=(2, 3), tokens=(0, 6)):
            ack = await link.send(data, request_id=rid, epoch=0, layer_start=layers[0], layer_end=layers[1],
                                  token_start=tokens[0], token_end=tokens[1])
            return await asyncio.wait_for(ack, 10)

        early = asyncio.ensure_future(send("r", slab))  # before the head's reserve frame
        await asyncio.sleep(0.2)
        await pipeline.reserve("r", blocks, 10)  # a 10-token prompt, its first 6 sent
        await early
        slots = torch.tensor([20, 21, 22, 23, 36, 37])
        assert torch.equal(stage.pool[:, :, slots], slab)
        assert await pipeline.landed("r") == [6] and await pipeline.landed("other") == [0]
        for rid, data, layers, tokens, why in [
                ("r", slab, (1, 2), (0, 6), "does not fit"),                # the head's layer, not this stage's
                ("r", slab[:, :, :2].contiguous(), (2, 3), (7, 9), "gap"),  # token 6 missing
                ("nobody", slab, (2, 3), (0, 6), "no KV room reserved")]:  # never announced
            with pytest.raises(KVRejected, match=why):
                await send(rid, data, layers, tokens)
        await pipeline.release("r")
        with pytest.raises(KVRejected, match="no KV room reserved"):
            await send("r", slab)
        assert not broken and stage.linked
    finally:
        await peers.close()
        await prompt_transport.close()
        await pipeline.close()
        for t in transports:
            await t.close()


async def test_a_reserve_takes_its_turn_behind_kv_for_the_blocks_last_owner(tiny_oracle, monkeypatch):
    """Blocks of a request just released get a new one, while "kv" frames of the old one (a restore's,
    sent on by the head) still queue on the stage behind a slow step: the new prompt's KV, sent
    straight to the stage, lands after them, not under them."""
    from common.kv.peers import Peers

    head, (stage,), pipeline, broken, transports, setup = await linked(tiny_oracle.model, stages=2)
    prompt_transport = make_transport("tcp", "secret")
    peers = Peers(prompt_transport)
    try:
        await pipeline.open(setup)
        (address, _, _), = pipeline.kv_routes
        kv, blocks, slots = head.kv, [5, 9], torch.tensor([20, 21, 22, 23, 36, 37])
        old, new = (torch.randn(1, 2, 6, kv.kv_heads, kv.head_dim) for _ in range(2))
        computes = stage.runner.forward

        def slowly(*args):
            time.sleep(0.5)
            return computes(*args)

        monkeypatch.setattr(stage.runner, "forward", slowly)
        segment = [Segment([1], 0, [0])]
        step = asyncio.ensure_future(pipeline.forward(segment, head.forward(segment, head.new_pool(BLOCKS))))
        await asyncio.sleep(0.1)  # the stage computes it, slowly
        await pipeline.send_kv(blocks, range(2, 3), range(0, 6), old)   # queued behind the step
        await pipeline.reserve("new", blocks, 6)                       # queued behind that
        link = await peers.get(address)
        ack = await link.send(new, request_id="new", epoch=0, layer_start=2, layer_end=3, token_start=0, token_end=6)
        await asyncio.wait_for(ack, 10)
        await step
        assert torch.equal(stage.pool[:, :, slots], new)
        assert not broken
    finally:
        await peers.close()
        await prompt_transport.close()
        await pipeline.close()
        for t in transports:
            await t.close()
