"""How a prompt service cuts its queue into forwards: whole prompts back to back up to
--max-batch-tokens; a longer prompt in chunks of that size, each chunk alone (a chunk attends to
the prompt's own pool, which no other prompt may write into)."""

from __future__ import annotations

import pytest

from common.protocol import PrefillRequest, SamplingParams
from common.settings import PromptSettings
from prompt_service.engine import PrefillEngine, PrefillJob

pytestmark = pytest.mark.asyncio


def job(rid: str, n: int) -> PrefillJob:
    req = PrefillRequest(request_id=rid, prompt_ids=list(range(1, n + 1)), sampling=SamplingParams(),
                         target_service_id="t", target_kv_address="")
    return PrefillJob(req, routes=[], links=[], messages={})


def forwards(engine: PrefillEngine) -> list[list[tuple[str, int, int]]]:
    """Every forward the queue makes, as (request, start, end) pieces; each piece counts as computed,
    and a prompt between its chunks holds a pool, as _execute leaves it."""
    out = []
    while work := engine._next_work():
        out.append([(p.job.req.request_id, p.start, p.end) for p in work])
        for p in work:
            p.job.done = p.end
            p.job.pool = object() if p.end < p.job.num_tokens else None
    return out


async def test_whole_prompts_batch_and_long_ones_run_in_chunks_alone():
    engine = PrefillEngine(runner=None, settings=PromptSettings(max_batch_tokens=16), peers=None)
    for rid, n in [("a", 3), ("b", 40), ("c", 8), ("d", 5), ("e", 16), ("f", 1)]:
        engine.queue.append(job(rid, n))
    assert forwards(engine) == [
        [("a", 0, 3)],                  # b does not fit beside it: it starts a forward of its own
        [("b", 0, 16)], [("b", 16, 32)], [("b", 32, 40)],  # its last chunk alone too, though c would fit
        [("c", 0, 8), ("d", 0, 5)],
        [("e", 0, 16)],
        [("f", 0, 1)],
    ]
    assert not engine.queue


async def test_taking_turns_a_forward_computes_at_most_turn_tokens():
    """With --cpu-placement turns the decode steps wait while a prompt forward runs: it is cut at
    TURN_TOKENS, whatever --max-batch-tokens allows (a smaller one still holds)."""
    from prompt_service.engine import TURN_TOKENS

    engine = PrefillEngine(runner=None, settings=PromptSettings(max_batch_tokens=4096, cpu_turns="/x"), peers=None)
    engine.queue.extend([job("a", 300), job("b", 300), job("c", 2 * TURN_TOKENS + 1)])
    assert forwards(engine) == [[("a", 0, 300)], [("b", 0, 300)], [("c", 0, 512)], [("c", 512, 1024)],
                                [("c", 1024, 1025)]]
    engine = PrefillEngine(runner=None, settings=PromptSettings(max_batch_tokens=4096), peers=None)
    engine.queue.extend([job("a", 300), job("b", 300)])
    assert forwards(engine) == [[("a", 0, 300), ("b", 0, 300)]]  # not taking turns: one forward
    engine = PrefillEngine(runner=None, settings=PromptSettings(max_batch_tokens=16, cpu_turns="/x"), peers=None)
    engine.queue.append(job("a", 20))
    assert forwards(engine) == [[("a", 0, 16)], [("a", 16, 20)]]


async def test_an_aborted_job_is_skipped():
    engine = PrefillEngine(runner=None, settings=PromptSettings(max_batch_tokens=16), peers=None)
    jobs = [job("a", 4), job("b", 4), job("c", 4)]
    engine.queue.extend(jobs)
    jobs[1].fail(RuntimeError("aborted"))
    jobs[1].result.exception()  # retrieved: no "never retrieved" warning
    assert forwards(engine) == [[("a", 0, 4), ("c", 0, 4)]]



async def test_an_aborted_job_leaves_no_acknowledgement_unretrieved():
    """A prefill aborted after some of its KV went out: the refusals that come back later for those
    messages are nobody's business any more, and must not be reported as errors ("Future exception
    was never retrieved", seen under overload in bench.overload)."""
    import asyncio
    import gc

    from prompt_service.engine import _forget

    loop, reported = asyncio.get_running_loop(), []
    loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
    try:
        refused, pending = loop.create_future(), loop.create_future()
        refused.set_exception(RuntimeError("no KV room reserved for request r"))  # came back before the abort
        _forget([refused, pending])
        assert pending.cancelled()  # its answer, should one come, is dropped by the link
        del refused, pending
        gc.collect()
        await asyncio.sleep(0)
        assert reported == []
        control = loop.create_future()  # without _forget it is reported: the check can fail
        control.set_exception(RuntimeError("x"))
        del control
        gc.collect()
        await asyncio.sleep(0)
        assert reported and "never retrieved" in reported[0]
    finally:
        loop.set_exception_handler(None)


async def test_a_newer_prefill_of_the_same_request_fails_the_earlier_one(tiny_model_path, monkeypatch):
    """A prompt service that stalled (its loop blocked for seconds) gets the gateway's retry of a
    request while the first call still runs: the newer wins, the earlier fails at once, and an
    abort then reaches the newer. Before, the newer took the earlier's place in `jobs`: the abort
    meant for the earlier hit the newer, and the earlier, unreachable, held its place in flight."""
    import asyncio

    import prompt_service.engine as prompt_engine
    from common.errors import UpstreamError
    from common.model import load_model
    from engine.runner import ModelRunner

    async def no_links(*args):
        return []

    monkeypatch.setattr(prompt_engine, "open_links", no_links)
    engine = PrefillEngine(ModelRunner(load_model(tiny_model_path), block_size=4), PromptSettings(), peers=None)
    before = prompt_engine.IN_FLIGHT._value.get()
    req = job("r", 5).req
    first = asyncio.create_task(engine.submit(req))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(engine.submit(req))
    with pytest.raises(UpstreamError, match="superseded"):
        await asyncio.wait_for(first, 5)
    assert engine.abort("r")
    with pytest.raises(UpstreamError, match="aborted"):
        await asyncio.wait_for(second, 5)
    assert not engine.jobs and prompt_engine.IN_FLIGHT._value.get() == before


async def test_an_earlier_call_that_registers_after_a_newer_one_fails_itself(tiny_model_path, monkeypatch):
    """The earlier call, still opening its links when the retry arrives and registers, must not
    take the retry's place (both carry the same epoch): the call that arrived last wins."""
    import asyncio

    import prompt_service.engine as prompt_engine
    from common.errors import UpstreamError
    from common.model import load_model
    from engine.runner import ModelRunner

    opened = asyncio.Event()
    calls = 0

    async def links(*args):
        nonlocal calls
        calls += 1
        if calls == 1:
            await opened.wait()  # the first call's links take long
        return []

    monkeypatch.setattr(prompt_engine, "open_links", links)
    engine = PrefillEngine(ModelRunner(load_model(tiny_model_path), block_size=4), PromptSettings(), peers=None)
    req = job("r", 5).req
    first = asyncio.create_task(engine.submit(req))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(engine.submit(req))
    await asyncio.sleep(0.05)
    newer = engine.jobs["r"]
    opened.set()
    with pytest.raises(UpstreamError, match="superseded"):
        await asyncio.wait_for(first, 5)
    assert engine.jobs["r"] is newer and not newer.result.done()
    assert engine.abort("r")
    with pytest.raises(UpstreamError, match="aborted"):
        await asyncio.wait_for(second, 5)
    assert not engine.jobs and not engine.arrivals
