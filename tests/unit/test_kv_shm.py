"""The same-host paths under the KV transports (common/kv/shm.py): what only they can get wrong.

The transport contract itself runs with rings in use in test_transport.py ("ucx+ring", "tcp+ring"),
and its two-process streaming test with payloads read from the sender's memory. Here: a full ring and a
wrapping one, headers that look like the layer's own, a peer that breaks the protocol, ring files
never left behind; reads from the sender's memory in flight together, declined, forged or cancelled.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest

from common.kv import TransportError, make_transport
from common.kv import shm
from common.kv.shm import MIN_BYTES, OFFER, OFFER_FMT, SLOT, SLOT_FMT

pytestmark = [pytest.mark.asyncio, pytest.mark.skipif(not shm.SUPPORTED, reason="rings are x86-64 only")]
BOUND_S = 5.0


def our_files() -> list[str]:
    return [f for f in os.listdir(shm.SHM_DIR) if f.startswith(f"dejavu-kv-{os.getpid()}-")]


class Cluster:
    """A server that keeps what it receives (or echoes it), and a connected client."""

    def __init__(self, name: str = "tcp", server_ring: int = shm.DEFAULT_RING_BYTES,
                 client_ring: int = shm.DEFAULT_RING_BYTES, server_cma: bool = False, client_cma: bool = False,
                 cma_min_bytes: int = MIN_BYTES):
        self.server = make_transport(name, ring_bytes=server_ring, cma=server_cma, cma_min_bytes=cma_min_bytes)
        self.client = make_transport(name, ring_bytes=client_ring, cma=client_cma, cma_min_bytes=cma_min_bytes)
        self.got: asyncio.Queue = asyncio.Queue()
        self.resume = asyncio.Event()  # a frame b"pause" parks the server until it is set
        self.server_conn = None

    async def __aenter__(self):
        async def keep(conn):
            self.server_conn = conn
            while True:
                header, payload = await conn.recv()
                if header == b"pause":
                    await self.resume.wait()
                    continue
                if header.startswith(b"echo"):
                    await conn.send(header, payload)
                self.got.put_nowait((header, payload))

        self.address = await self.server.listen(keep, "127.0.0.1")
        self.conn = await self.client.connect(self.address)
        return self

    async def __aexit__(self, *exc):
        await self.client.close()
        await self.server.close()

    async def ring_up(self) -> None:
        """Frames until the client's ring is mapped by the server (the client offers at its second
        large payload and reads the answer in a later recv)."""
        for _ in range(6):
            await self.conn.send(b"echo", np.zeros(MIN_BYTES, dtype=np.uint8))
            await asyncio.wait_for(self.conn.recv(), BOUND_S)
            await asyncio.wait_for(self.got.get(), BOUND_S)
            if self.conn.ring_out:
                return
        raise AssertionError("the client's ring did not come up")


def payload(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


async def test_a_full_ring_sends_inline_and_a_wrapping_one_keeps_every_frame():
    """Ring of 1 MiB, frames of 300 KB, the server not reading: three fit, the rest go inline
    (never waiting for room); once it reads, positions start over at the ring's beginning. Over TCP,
    whose socket buffers hold the inline ones (UCX's rendezvous would wait for the reader)."""
    async with Cluster("tcp", client_ring=1 << 20) as c:
        await c.ring_up()
        await c.conn.send(b"pause")
        sent = [payload(300_000, seed) for seed in range(8)]
        before = c.conn.ring_frames["sent"]
        for i, p in enumerate(sent):
            await asyncio.wait_for(c.conn.send(b"kv-%d" % i, p), BOUND_S)
        assert c.conn.ring_frames["sent"] - before == 3  # 3 x 300 KB fit in 1 MiB, the next 5 do not
        c.resume.set()
        for i, p in enumerate(sent):
            header, back = await asyncio.wait_for(c.got.get(), BOUND_S)
            assert header == b"kv-%d" % i
            np.testing.assert_array_equal(back, p)
        for round_ in range(3):  # room again, wrapping past the ring's end
            more = [payload(300_000, 100 + 10 * round_ + k) for k in range(3)]
            for k, p in enumerate(more):
                await c.conn.send(b"again-%d" % k, p)
            for k, p in enumerate(more):
                header, back = await asyncio.wait_for(c.got.get(), BOUND_S)
                assert header == b"again-%d" % k
                np.testing.assert_array_equal(back, p)
        assert c.conn.ring_frames["sent"] - before == 3 + 9
    assert not our_files()


async def test_headers_that_start_with_a_zero_byte_are_the_applications():
    async with Cluster() as c:
        await c.ring_up()
        for header, n in [(b"\0", 0), (b"\0S\0\0", 10), (b"\0O", MIN_BYTES), (b"\0\0\0", 2 * MIN_BYTES)]:
            p = payload(n, n)
            await c.conn.send(header, p)
            got, back = await asyncio.wait_for(c.got.get(), BOUND_S)
            assert got == header
            np.testing.assert_array_equal(back, p)


async def test_a_side_with_rings_off_declines_and_frames_go_inline():
    async with Cluster(server_ring=0) as c:
        for seed in range(3):
            p = payload(2 * MIN_BYTES, seed)
            await c.conn.send(b"echo", p)
            _, back = await asyncio.wait_for(c.conn.recv(), BOUND_S)
            np.testing.assert_array_equal(back, p)
            await c.got.get()
        assert not c.conn.ring_out and c.conn.ring_frames == {"sent": 0, "received": 0}
        assert not c.server_conn.ring_out
    assert not our_files()


@pytest.mark.parametrize("name", ["../../etc/passwd", "dejavu-kv-1-0123456789abcdef", "x" * 300])
async def test_an_offer_of_a_file_that_is_not_a_ring_is_declined_and_the_link_goes_on(name):
    async with Cluster() as c:
        offer = OFFER + OFFER_FMT.pack(b"c" * 16, 1 << 20) + name.encode()
        await c.conn.inner.send(offer)  # beneath the client's own layer
        answer, _ = await asyncio.wait_for(c.conn.inner.recv(), BOUND_S)
        assert answer == shm.ANSWER + shm.NO
        await c.conn.send(b"still", payload(10, 0))
        header, _ = await asyncio.wait_for(c.got.get(), BOUND_S)
        assert header == b"still" and not c.server_conn.closed


async def test_an_offer_with_the_wrong_cookie_is_declined():
    ring, path, cookie = shm.create_ring(1 << 20)
    try:
        async with Cluster() as c:
            await c.conn.inner.send(OFFER + OFFER_FMT.pack(b"x" * 16, 1 << 20) + os.path.basename(path).encode())
            answer, _ = await asyncio.wait_for(c.conn.inner.recv(), BOUND_S)
            assert answer == shm.ANSWER + shm.NO
            assert os.path.exists(path)  # not unlinked by the one who could not prove it was offered
    finally:
        ring.close()
        shm.unlink(path)


@pytest.mark.parametrize("frame", [
    SLOT + SLOT_FMT.pack(0, 100) + b"h",          # a ring frame, but no ring was offered
    b"\0Z",                                       # a kind that does not exist
    shm.ANSWER + shm.YES,                         # an answer to no offer
])
async def test_a_peer_breaking_the_protocol_ends_the_link_not_the_service(frame):
    async with Cluster() as c:
        await c.conn.inner.send(frame)
        with pytest.raises(TransportError):
            await asyncio.wait_for(c.conn.inner.recv(), BOUND_S)  # the server's side of the link ended
        fresh = await c.client.connect(c.address)  # and the server still serves
        await fresh.send(b"echo", payload(10, 1))
        header, _ = await asyncio.wait_for(fresh.recv(), BOUND_S)
        assert header == b"echo"


async def test_a_ring_frame_out_of_place_ends_the_link():
    async with Cluster() as c:
        await c.ring_up()
        await c.conn.inner.send(SLOT + SLOT_FMT.pack(shm.DEFAULT_RING_BYTES - 10, 100) + b"h")  # past the end
        await asyncio.sleep(0.2)
        assert c.server_conn.closed


async def test_a_control_frame_with_a_payload_ends_the_link():
    async with Cluster() as c:
        await c.conn.inner.send(shm.ANSWER + shm.NO, np.zeros(10, dtype=np.uint8))
        await asyncio.sleep(0.2)
        assert c.server_conn.closed


async def test_ring_files_of_dead_processes_are_swept_and_live_ones_kept():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = os.path.join(shm.SHM_DIR, f"dejavu-kv-{int(dead.stdout)}-0123456789abcdef")
    live = os.path.join(shm.SHM_DIR, f"dejavu-kv-{os.getppid()}-fedcba9876543210")
    for path in (gone, live):
        with open(path, "wb") as f:
            f.write(b"x")
        os.utime(path, (0, 0))  # old: a younger one may be a pending offer of another PID namespace
    try:
        ring, path, _ = shm.create_ring(1 << 20)  # sweeps first
        ring.close()
        shm.unlink(path)
        assert not os.path.exists(gone) and os.path.exists(live)
    finally:
        shm.unlink(gone)
        shm.unlink(live)


async def test_an_unanswered_offer_is_unlinked_at_close():
    async with Cluster() as c:
        await c.conn.send(b"pause")
        await c.conn.send(b"big", payload(MIN_BYTES, 1))
        assert not our_files()  # a link that carries one large payload never makes a ring
        await c.conn.send(b"big", payload(MIN_BYTES, 2))  # offers; the server never answers
        assert our_files()
    assert not our_files()


@pytest.mark.parametrize("name", ["tcp", "ucx"])
async def test_both_ends_streaming_large_payloads_at_once_on_a_new_link_keep_every_frame(name):
    """Offers cross while both sides' large sends are in flight. (Answering an offer inside the
    reader, behind its own side's send, could stall both readers across processes; in one process
    that did not show, so this checks the frames, not that stall.)"""
    server, client = make_transport(name), make_transport(name)
    n, size = 6, 16 << 20  # more than loopback's socket buffers hold: a large send waits for the reader

    async def stream(conn, got: list) -> None:
        async def read():
            for _ in range(n):
                got.append(await conn.recv())
        reader = asyncio.ensure_future(read())
        for i in range(n):
            await conn.send(b"x%d" % i, sent[i])
        await reader

    got_server, got_client, done = [], [], asyncio.Event()
    sent = [payload(size, i) for i in range(n)]

    async def serve(conn):
        await stream(conn, got_server)
        done.set()
        await asyncio.sleep(3600)

    try:
        conn = await client.connect(await server.listen(serve, "127.0.0.1"))
        await asyncio.wait_for(asyncio.gather(stream(conn, got_client), done.wait()), 20)
        for got in (got_server, got_client):
            assert [h for h, _ in got] == [b"x%d" % i for i in range(n)]
            for i, (_, p) in enumerate(got):
                np.testing.assert_array_equal(p, sent[i])
    finally:
        await client.close()
        await server.close()


async def test_an_allocator_failing_on_a_ring_frame_breaks_the_link_for_good():
    async with Cluster() as c:
        for _ in range(8):  # until the server's echoes come back through its ring
            await c.conn.send(b"echo", payload(MIN_BYTES, 3))
            await asyncio.wait_for(c.conn.recv(), BOUND_S)
            await c.got.get()
            if c.conn.ring_frames["received"]:
                break
        else:
            raise AssertionError("the server's ring did not come up")

        def refuse(header, nbytes):
            raise TransportError("no room for it")

        through_ring = c.server_conn.ring_frames["sent"]
        await c.conn.send(b"echo", payload(MIN_BYTES, 4))
        with pytest.raises(TransportError, match="no room"):
            await asyncio.wait_for(c.conn.recv(refuse), BOUND_S)
        assert c.server_conn.ring_frames["sent"] == through_ring + 1 and c.conn.closed
        with pytest.raises(TransportError, match="broken"):
            await asyncio.wait_for(c.conn.recv(), BOUND_S)  # at once, not waiting for the next frame
        with pytest.raises(TransportError, match="broken"):
            await c.conn.send(b"more", payload(MIN_BYTES, 6))


# Payloads read from the sender's memory (process_vm_readv): offered before a ring.

cma_only = pytest.mark.skipif(not shm.CMA_SUPPORTED, reason="no process_vm_readv here")


async def cma_up(c: Cluster, n: int = MIN_BYTES) -> asyncio.Task:
    """The client's large payloads read by the server from the client's memory; returns the
    client's reader (it takes the server's answers and read receipts, and keeps its echoes)."""
    echoes: asyncio.Queue = asyncio.Queue()

    async def read():
        while True:
            echoes.put_nowait(await c.conn.recv())

    reader = asyncio.ensure_future(read())
    reader.echoes = echoes
    c.conn.keep_reading()
    for seed in range(6):
        await asyncio.wait_for(c.conn.send(b"kv", payload(n, seed)), BOUND_S)
        await asyncio.wait_for(c.got.get(), BOUND_S)
        if c.conn.cma_out:
            return reader
    raise AssertionError("the server did not take the client's offer of its memory")


@cma_only
@pytest.mark.parametrize("name", ["tcp", "ucx"])
async def test_large_payloads_are_read_from_the_senders_memory_in_flight_together(name):
    async with Cluster(name, server_cma=True, client_cma=True, cma_min_bytes=2 * MIN_BYTES) as c:
        reader = await cma_up(c, 2 * MIN_BYTES)
        before = dict(c.conn.cma_frames)
        sent = [payload(MIN_BYTES * (k + 2) + k, 10 + k) for k in range(6)]
        await asyncio.wait_for(asyncio.gather(*(c.conn.send(b"kv-%d" % i, p) for i, p in enumerate(sent))), BOUND_S)
        for i, p in enumerate(sent):
            header, back = await asyncio.wait_for(c.got.get(), BOUND_S)
            assert header == b"kv-%d" % i
            np.testing.assert_array_equal(back, p)
        assert c.conn.cma_frames["sent"] - before["sent"] == 6 and c.server_conn.cma_frames["received"] >= 6
        assert not c.conn._reads  # no payload left pinned
        await c.conn.send(b"small", payload(10, 1))  # small ones still ride in their frame
        assert (await asyncio.wait_for(c.got.get(), BOUND_S))[0] == b"small"
        mid = payload(MIN_BYTES, 2)  # under cma_min_bytes: not read from memory (by the ring, once offered)
        await c.conn.send(b"mid", mid)
        header, back = await asyncio.wait_for(c.got.get(), BOUND_S)
        assert header == b"mid" and c.conn.cma_frames["sent"] - before["sent"] == 6
        np.testing.assert_array_equal(back, mid)
        reader.cancel()


@cma_only
async def test_a_peer_that_does_not_read_memory_declines_and_a_ring_comes_up_instead():
    async with Cluster(server_cma=False, client_cma=True) as c:
        c.conn.keep_reading()  # (ring_up reads between its sends: no payload would go by memory anyway)
        await c.ring_up()
        assert c.conn._cma_declined and not c.conn.cma_out and c.conn.ring_out


@cma_only
async def test_a_proof_without_the_challenge_at_its_address_is_declined_and_there_is_one_try():
    """A peer cannot point the receiver at memory it did not write the challenge into (another
    process's, or its own without the challenge); nor guess again on the same link."""
    decoy = np.frombuffer(bytearray(b"y" * 16), dtype=np.uint8)
    async with Cluster(server_cma=True) as c:
        await c.conn.inner.send(shm.CMA_OFFER)
        challenge, _ = await asyncio.wait_for(c.conn.inner.recv(), BOUND_S)
        assert challenge[:2] == shm.CHALLENGE and len(challenge) == 2 + 16
        await c.conn.inner.send(shm.PROOF + shm.PROOF_FMT.pack(os.getpid(), decoy.ctypes.data))
        answer, _ = await asyncio.wait_for(c.conn.inner.recv(), BOUND_S)
        assert answer == shm.CMA_ANSWER + shm.NO and c.server_conn._cma_from is None
        await c.conn.inner.send(shm.CMA_OFFER)  # again: no second challenge
        answer, _ = await asyncio.wait_for(c.conn.inner.recv(), BOUND_S)
        assert answer == shm.CMA_ANSWER + shm.NO
        await c.conn.send(b"still", payload(10, 2))  # the link goes on
        assert (await asyncio.wait_for(c.got.get(), BOUND_S))[0] == b"still"


@cma_only
async def test_a_proof_naming_another_process_is_declined():
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        async with Cluster(server_cma=True) as c:
            await c.conn.inner.send(shm.CMA_OFFER)
            challenge, _ = await asyncio.wait_for(c.conn.inner.recv(), BOUND_S)
            ours = np.frombuffer(bytearray(challenge[2:]), dtype=np.uint8)  # in our memory, not in `other`'s
            await c.conn.inner.send(shm.PROOF + shm.PROOF_FMT.pack(other.pid, ours.ctypes.data))
            answer, _ = await asyncio.wait_for(c.conn.inner.recv(), BOUND_S)
            assert answer == shm.CMA_ANSWER + shm.NO and c.server_conn._cma_from is None
    finally:
        other.kill()
        other.wait()


@cma_only
@pytest.mark.parametrize("frame", [
    shm.READ + shm.READ_FMT.pack(0, 4096, 100) + b"h",   # a read, but no memory was offered
    shm.DONE + shm.DONE_FMT.pack(7),                     # the end of a read never asked for
    shm.CMA_ANSWER + shm.YES,                            # an answer to no offer
    shm.PROOF + shm.PROOF_FMT.pack(1, 4096),             # a proof of no challenge
    shm.CHALLENGE + b"x" * 16,                           # a challenge to no offer
])
async def test_a_peer_breaking_the_memory_protocol_ends_the_link(frame):
    async with Cluster(server_cma=True) as c:
        await c.conn.inner.send(frame)
        with pytest.raises(TransportError):
            await asyncio.wait_for(c.conn.inner.recv(), BOUND_S)


@cma_only
async def test_a_read_of_memory_the_sender_does_not_have_ends_the_link():
    async with Cluster(server_cma=True, client_cma=True) as c:
        reader = await cma_up(c)
        await c.conn.inner.send(shm.READ + shm.READ_FMT.pack(99, 4096, MIN_BYTES) + b"kv")  # page 1: never mapped
        await asyncio.sleep(0.2)
        assert c.server_conn.closed and c.got.empty()
        reader.cancel()


@cma_only
async def test_a_send_cancelled_while_its_payload_is_read_breaks_the_link_and_pins_it_until_close():
    async with Cluster(server_cma=True, client_cma=True) as c:
        reader = await cma_up(c)
        await c.conn.send(b"pause")  # the server stops reading: the next read is never done
        p = payload(MIN_BYTES, 5)
        send = asyncio.ensure_future(c.conn.send(b"kv", p))
        await asyncio.sleep(0.1)
        send.cancel()
        with pytest.raises(asyncio.CancelledError):
            await send
        assert c.conn.closed and any(body is p or body.base is p for _, body in c.conn._reads.values())
        with pytest.raises(TransportError):
            await c.conn.send(b"after", p)
        reader.cancel()
    assert not c.conn._reads  # released at close
