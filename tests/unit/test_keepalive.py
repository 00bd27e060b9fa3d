"""A streaming response quiet for a while (a failover replaying a long output, a queue) carries SSE
comments, so that proxies and clients with idle timeouts keep the stream: gateway.serving.with_keepalive."""

import asyncio

import pytest

from gateway.serving import KEEPALIVE, with_keepalive


async def slow(gaps: list[float]):
    for i, gap in enumerate(gaps):
        await asyncio.sleep(gap)
        yield i


@pytest.mark.asyncio
async def test_quiet_stretches_get_keepalives_and_every_item_comes_through_in_order():
    got = [x async for x in with_keepalive(slow([0, 0.35, 0, 0.05]), every_s=0.1)]
    items = [x for x in got if x is not KEEPALIVE]
    assert items == [0, 1, 2, 3]
    between = got[got.index(0) + 1: got.index(1)]
    assert 2 <= len(between) <= 4 and all(x is KEEPALIVE for x in between)  # ~0.35 s / 0.1 s
    assert KEEPALIVE not in got[got.index(1):]  # no gap there reached 0.1 s


@pytest.mark.asyncio
async def test_closing_it_mid_wait_stops_the_source_and_the_source_can_be_closed():
    closed = asyncio.Event()

    async def source():
        try:
            yield 0
            await asyncio.sleep(60)
            yield 1
        finally:
            closed.set()

    gen = source()
    ticks = with_keepalive(gen, every_s=0.05)
    assert await anext(ticks) == 0
    assert await anext(ticks) is KEEPALIVE  # now waiting on gen in a task
    await ticks.aclose()  # as the gateway does when the client goes
    await gen.aclose()  # no "already running": the waiting task was cancelled
    await asyncio.wait_for(closed.wait(), 1)
