"""Sender-side KV links against a receiver that stops (issue #10 item 16): a SIGSTOPped peer (a
real process, over UCX and TCP) no longer drains its socket; a send then fails within its timeout
and closes the link, instead of stalling every request that uses it for good. Acknowledgements
nobody waits for any more are forgotten, not kept forever."""

from __future__ import annotations

import asyncio
import signal
import sys

import numpy as np
import pytest
import pytest_asyncio

from common.kv import TRANSPORTS, make_transport
from common.kv.peers import Peers
from common.kv.transport import TransportError
from tests.unit.test_transport import ROOT, read_address

pytestmark = pytest.mark.asyncio
BOUND_S = 20.0  # bound on every wait that must not hang; never asserted as a latency
BIG = np.zeros(64 << 20, dtype=np.float32)  # 256 MiB: far past what socket buffers take while nobody reads
FIELDS = dict(epoch=0, layer_start=0, layer_end=1, token_start=0, token_end=1)


@pytest.fixture(params=TRANSPORTS)
def name(request) -> str:
    return request.param


@pytest_asyncio.fixture
async def peer(name):
    """A real peer process (an echo server), and a client transport."""
    client = make_transport(name)
    child = await asyncio.create_subprocess_exec(sys.executable, str(ROOT / "tests/unit/test_transport.py"), name,
                                                 stdout=asyncio.subprocess.PIPE, cwd=ROOT)
    try:
        yield await asyncio.wait_for(read_address(child), 60), child, client
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGCONT)
            child.kill()
            await child.wait()
        await client.close()


async def test_a_send_to_a_stopped_peer_times_out_and_closes_the_link(peer):
    address, child, client = peer
    peers = Peers(client, send_timeout=1.0)
    link = await asyncio.wait_for(peers.get(address), BOUND_S)
    child.send_signal(signal.SIGSTOP)
    with pytest.raises(TransportError, match="timed out"):
        await asyncio.wait_for(link.send(BIG, request_id="r1", **FIELDS), BOUND_S)
    assert link.conn.closed and link.waiting == {}
    with pytest.raises(TransportError):  # the next send on that link fails at once
        await link.send(BIG[:16], request_id="r2", **FIELDS)
    await peers.close()


async def test_acknowledgements_nobody_awaits_are_forgotten(peer):
    address, child, client = peer
    peers = Peers(client)
    link = await asyncio.wait_for(peers.get(address), BOUND_S)
    child.send_signal(signal.SIGSTOP)  # small frames go out; no answer comes back
    for i in range(50):
        ack = await asyncio.wait_for(link.send(BIG[:64], request_id=f"r{i}", **FIELDS), BOUND_S)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ack, 0.01)  # the waiter gives up (as the replicator does after its timeout)
    await asyncio.sleep(0)
    assert link.waiting == {}, f"{len(link.waiting)} acknowledgements kept for waiters long gone"
    await peers.close()


@pytest.mark.parametrize("name", ["tcp"])  # TCP: a dead peer's link is only broken until someone closes it
async def test_a_link_whose_peer_died_is_closed_when_forgotten(peer):
    """Links to peers that are gone are dropped at the next get for another peer, and closed then
    (their socket, and a shared-memory ring they hold), not left for the process's exit."""
    address, child, client = peer
    peers = Peers(client)
    link = await asyncio.wait_for(peers.get(address), BOUND_S)
    child.kill()
    await child.wait()
    await asyncio.wait_for(asyncio.gather(link.reader, return_exceptions=True), BOUND_S)  # it saw the end
    assert link.conn.closed and not link.conn.inner._closed  # broken, not yet closed
    other = make_transport("tcp")
    try:
        await asyncio.wait_for(peers.get(await other.listen(lambda conn: asyncio.sleep(3600), "127.0.0.1")), BOUND_S)
        await asyncio.sleep(0.1)
        assert address not in peers.links and link.conn.inner._closed
    finally:
        await peers.close()
        await other.close()


@pytest.mark.parametrize("transport", ["tcp", "ucx"])
async def test_time_behind_other_frames_does_not_count_against_a_send(transport):
    """A receiver that drains slowly but surely (a frame every 2 s): three 64 MiB frames sent at
    once with a 3 s send timeout all get out (each frame's own write takes about 2 s; the third
    waits about 4 s for its turn). Before, the timeout also ran while a send waited its turn behind
    the others, and the third cut the link mid-frame for everyone."""
    server, client = make_transport(transport), make_transport(transport)

    async def slow_reader(conn):
        while True:
            await conn.recv()
            await asyncio.sleep(2.0)

    try:
        address = await server.listen(slow_reader, "127.0.0.1")
        peers = Peers(client, send_timeout=3.0)
        link = await asyncio.wait_for(peers.get(address), BOUND_S)
        frames = [link.send(BIG[: 16 << 20], request_id=f"r{i}", **FIELDS) for i in range(3)]
        results = await asyncio.wait_for(asyncio.gather(*frames, return_exceptions=True), BOUND_S)
        assert [type(r).__name__ for r in results] == ["Future"] * 3, results
        assert not link.conn.closed
        await peers.close()
    finally:
        await client.close()
        await server.close()


async def test_acknowledgements_a_broken_link_fails_log_nothing_when_nobody_awaits_them(peer):
    """A peer killed with acknowledgements pending: a sender that awaits one hears the link broke;
    those nobody awaits (their prefill failed first, on another send) are no "Future exception was
    never retrieved" in the log (a probe saw one in the prompt service at each token-service kill)."""
    import gc

    address, child, client = peer
    loop = asyncio.get_running_loop()
    errors, previous = [], loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        peers = Peers(client)
        link = await asyncio.wait_for(peers.get(address), BOUND_S)
        child.send_signal(signal.SIGSTOP)  # nothing is acknowledged
        awaited = await asyncio.wait_for(link.send(BIG[:64], request_id="awaited", **FIELDS), BOUND_S)
        await asyncio.wait_for(link.send(BIG[:64], request_id="forgotten", **FIELDS), BOUND_S)  # dropped
        child.kill()  # (stopped still: it echoes nothing before it dies)
        with pytest.raises(TransportError, match="broke|closed"):
            await asyncio.wait_for(awaited, BOUND_S)
        await peers.close()
        gc.collect()  # the forgotten future goes: asyncio logs it now if its exception was never read
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert not errors, [c.get("message") for c in errors]
