"""Transport contract tests, run identically against every implementation (UCX and TCP), each with
its same-host paths off ("ucx", "tcp") and with rings on and in use ("ucx+ring", "tcp+ring":
connections are warmed up until large payloads go through a ring each way; common/kv/shm.py).
Payloads read from the sender's memory ("+cma", on by default) need a reader on the sending side
while it sends, which most contract tests (send, then recv) do not have: the two-process streaming
test and test_kv_shm.py run them.

Also a script: `python tests/unit/test_transport.py NAME` serves an "inverting echo" on
127.0.0.1 (each frame comes back with its payload bit-inverted) and prints `LISTENING addr`.
The two-process test runs it as its peer.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # also when run as a script by the two-process test

from common.kv import TRANSPORTS, Connection, TransportError, make_transport  # noqa: E402
from common.kv import shm  # noqa: E402
from common.kv.shm import CMA_SUPPORTED, MIN_BYTES, SUPPORTED  # noqa: E402
from common.kv.transport import MAX_HEADER_LEN  # noqa: E402

MiB = 1 << 20
BOUND_S = 5.0  # bound on every wait that must not hang; never asserted as a latency


async def echo(conn: Connection) -> None:
    """Send every frame back as it came, until the peer goes away."""
    while True:
        header, payload = await conn.recv()
        await conn.send(header, payload)


async def inverting_echo(conn: Connection) -> None:
    while True:
        header, payload = await conn.recv()
        await conn.send(header, np.bitwise_not(payload))


def random_bytes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=[*TRANSPORTS, *(f"{t}+ring" for t in TRANSPORTS if SUPPORTED)])
def name(request) -> str:
    return request.param


def transport_of(name: str):
    """make_transport's, with rings in use ("+ring"), payloads read from the sender ("+cma"), or neither."""
    base, _, mode = name.partition("+")
    transport = make_transport(base, ring_bytes=0 if not mode else shm.DEFAULT_RING_BYTES, cma=mode == "cma")
    transport.warm = mode  # connect_to warms its connections up
    return transport


@pytest_asyncio.fixture
async def pair(name):
    """(server transport, client transport), closed after the test."""
    server, client = transport_of(name), transport_of(name)
    try:
        yield server, client
    finally:
        await client.close()
        await server.close()


async def connect_to(pair, handler=echo) -> Connection:
    server, client = pair
    address = await server.listen(handler, "127.0.0.1")
    conn = await asyncio.wait_for(client.connect(address), BOUND_S)
    if getattr(client, "warm", "") and handler in (echo, inverting_echo):
        await warm_up(conn)
    return conn


async def warm_up(conn: Connection) -> None:
    """Large frames back and forth until both ends have mapped each other's ring (each side offers
    at its second large payload, and reads the answer in a later recv)."""
    for _ in range(8):
        await asyncio.wait_for(conn.send(b"warm", np.zeros(MIN_BYTES, dtype=np.uint8)), BOUND_S)
        await asyncio.wait_for(conn.recv(), BOUND_S)
        if conn.ring_out and conn.ring_frames["received"]:
            return
    raise AssertionError("the rings did not come up")


@pytest.mark.asyncio
async def test_make_transport_rejects_unknown_name():
    with pytest.raises(ValueError, match="ucx, tcp"):
        make_transport("carrier-pigeon")


@pytest.mark.asyncio
# 65,508: with its 12-byte header, exactly UCX's 64 KiB head; 65,509: one byte over, a second message
@pytest.mark.parametrize("size", [0, 1024, 65_508, 65_509, 16 * MiB])
async def test_echo_keeps_frames_intact(pair, size):
    conn = await connect_to(pair)
    payload = random_bytes(size, seed=size)
    await asyncio.wait_for(conn.send(b"header-%d" % size, payload), BOUND_S)
    header, back = await asyncio.wait_for(conn.recv(), BOUND_S)
    assert header == b"header-%d" % size
    assert back.dtype == np.uint8 and back.shape == (size,)
    np.testing.assert_array_equal(back, payload)


@pytest.mark.asyncio
async def test_a_header_over_the_limit_is_refused_before_sending_and_the_link_stays_up(pair):
    conn = await connect_to(pair)
    with pytest.raises(ValueError, match="frame header of"):
        await conn.send(b"h" * (MAX_HEADER_LEN + 1), random_bytes(10))
    assert not conn.closed
    await asyncio.wait_for(conn.send(b"h" * MAX_HEADER_LEN, random_bytes(10)), BOUND_S)
    header, back = await asyncio.wait_for(conn.recv(), BOUND_S)
    assert header == b"h" * MAX_HEADER_LEN and back.tobytes() == random_bytes(10).tobytes()


@pytest.mark.asyncio
async def test_ucx_a_head_too_long_ends_the_link_and_a_short_one_replays_nothing():
    """What only a broken peer sends, under Connection.send: a first message past 64 KiB fails the
    receiver's recv and ends the link; one shorter than its prefix claims reads as zeros past
    what it carried, never as the previous frame (ucxx does not say how long a message was)."""
    from common.kv.ucx import HEAD_BYTES, UcxTransport

    server, client = UcxTransport(), UcxTransport()  # bare: no shared-memory layer (common/kv/shm.py) on top
    try:
        conn = await connect_to((server, client))
        await asyncio.wait_for(conn.send(b"first", random_bytes(1000)), BOUND_S)
        await asyncio.wait_for(conn.recv(), BOUND_S)  # the echo side's head buffer held this frame
        from common.kv.transport import FRAME_PREFIX

        await conn._call("send", np.frombuffer(FRAME_PREFIX.pack(5, 1000), dtype=np.uint8))  # claims, carries none
        header, back = await asyncio.wait_for(conn.recv(), BOUND_S)  # echoed as the server read it
        assert header == b"\0" * 5 and not back.any()
        await conn._call("send", np.zeros(HEAD_BYTES + 1, dtype=np.uint8))
        with pytest.raises(TransportError):
            await asyncio.wait_for(conn.recv(), BOUND_S)
    finally:
        await client.close()
        await server.close()


@pytest.mark.asyncio
async def test_recv_fills_the_allocators_buffer(pair):
    conn = await connect_to(pair)
    arena = np.zeros(3 * MiB, dtype=np.uint8)
    seen = []

    def alloc(header: bytes, nbytes: int) -> np.ndarray:
        seen.append((header, nbytes))
        return arena[MiB : MiB + nbytes]

    payload = random_bytes(MiB)
    await asyncio.wait_for(conn.send(b"h", memoryview(payload.tobytes())), BOUND_S)
    _, back = await asyncio.wait_for(conn.recv(alloc), BOUND_S)
    assert seen == [(b"h", MiB)]
    assert np.shares_memory(back, arena)
    np.testing.assert_array_equal(arena[MiB : 2 * MiB], payload)
    assert not arena[:MiB].any() and not arena[2 * MiB :].any()


@pytest.mark.asyncio
async def test_failing_allocator_breaks_the_connection(pair):
    conn = await connect_to(pair)

    def refuse(header: bytes, nbytes: int) -> np.ndarray:
        raise LookupError("no room")

    await asyncio.wait_for(conn.send(b"h", random_bytes(1024)), BOUND_S)
    with pytest.raises(LookupError):
        await asyncio.wait_for(conn.recv(refuse), BOUND_S)
    assert conn.closed  # the payload was left unread: the stream is out of step
    with pytest.raises(TransportError):
        await asyncio.wait_for(conn.recv(), BOUND_S)


@pytest.mark.asyncio
async def test_concurrent_senders_keep_frames_whole(pair):
    conn = await connect_to(pair)
    senders, frames = 8, 12

    def frame(i: int, j: int) -> tuple[bytes, np.ndarray]:
        size = (i * 7919 + j * 104729) % (256 * 1024) + (MiB if j % 5 == 0 else 0)
        return f"{i}:{j}".encode(), np.full(size, (i * frames + j) % 256, dtype=np.uint8)

    async def sender(i: int) -> None:
        for j in range(frames):
            await conn.send(*frame(i, j))

    async def reader() -> list[bytes]:
        headers = []
        for _ in range(senders * frames):
            header, payload = await conn.recv()
            i, j = map(int, header.decode().split(":"))
            np.testing.assert_array_equal(payload, frame(i, j)[1])
            headers.append(header)
        return headers

    reading = asyncio.create_task(reader())
    await asyncio.wait_for(asyncio.gather(*(sender(i) for i in range(senders))), 4 * BOUND_S)
    headers = await asyncio.wait_for(reading, 4 * BOUND_S)
    for i in range(senders):  # each sender's frames arrive in the order it sent them
        mine = [h for h in headers if h.startswith(b"%d:" % i)]
        assert mine == [b"%d:%d" % (i, j) for j in range(frames)]


@pytest.mark.asyncio
async def test_peer_close_fails_pending_recv(pair):
    handler_done = asyncio.get_running_loop().create_future()

    async def close_after_one_frame(conn: Connection) -> None:
        await conn.recv()
        await conn.close()
        handler_done.set_result(conn.closed)

    conn = await connect_to(pair, close_after_one_frame)
    await asyncio.wait_for(conn.send(b"bye"), BOUND_S)
    with pytest.raises(TransportError):
        await asyncio.wait_for(conn.recv(), BOUND_S)
    assert conn.closed
    with pytest.raises(TransportError):
        await asyncio.wait_for(conn.send(b"after"), BOUND_S)
    assert await asyncio.wait_for(handler_done, BOUND_S) is True


@pytest.mark.asyncio
async def test_local_close_fails_pending_recv_on_both_sides(pair):
    server_saw = asyncio.get_running_loop().create_future()

    async def wait_for_frame(conn: Connection) -> None:
        try:
            await conn.recv()
        except TransportError as e:
            server_saw.set_result(e)
            raise

    conn = await connect_to(pair, wait_for_frame)
    pending = asyncio.create_task(conn.recv())
    await asyncio.sleep(0.05)  # let the recv block
    await conn.close()
    await conn.close()  # idempotent
    with pytest.raises(TransportError):
        await asyncio.wait_for(pending, BOUND_S)
    assert isinstance(await asyncio.wait_for(server_saw, BOUND_S), TransportError)


@pytest.mark.asyncio
async def test_closing_the_transport_fails_a_recv_still_pending(pair):
    """A recv another task awaits fails promptly when its side's transport closes (over UCX, the
    closing endpoint cancels it, and the loop completes the cancelled request)."""
    conn = await connect_to(pair)
    pending = asyncio.create_task(conn.recv())
    await asyncio.sleep(0.05)  # let the recv block
    await asyncio.wait_for(pair[1].close(), BOUND_S)
    with pytest.raises(TransportError):
        await asyncio.wait_for(pending, 1.0)


@pytest.mark.asyncio
async def test_a_connect_that_outlives_its_transports_close_makes_no_ucx_of_its_own():
    """close() during a connect's rendezvous resets UCX (the process's last transport): the connect
    then fails, and does not call ucxx again, which would make ucxx a new context of its own, in its
    default mode, with a progress thread. The peer is a bare TCP server that answers the
    rendezvous with the worker address it was sent, once the transport has closed."""
    from common.kv.ucx import RENDEZVOUS, UcxTransport, _Runtime

    transport = UcxTransport()
    closed, got_hello = asyncio.Event(), asyncio.Event()

    async def late_peer(reader, writer):
        head = await reader.readexactly(RENDEZVOUS.size)  # the connecting side's hello, sent first
        _, _, n, t = RENDEZVOUS.unpack(head)
        hello = head + await reader.readexactly(n + t)
        got_hello.set()
        await closed.wait()
        writer.write(hello)  # its own worker address back, and its (empty) token
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(late_peer, "127.0.0.1", 0)
    try:
        connecting = asyncio.create_task(transport.connect(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", BOUND_S))
        await asyncio.wait_for(got_hello.wait(), BOUND_S)
        await transport.close()
        assert _Runtime.users == 0, "another UCX transport of this process is still open: UCX was not reset"
        closed.set()
        with pytest.raises(TransportError, match="closed"):
            await asyncio.wait_for(connecting, BOUND_S)
        assert transport._ucxx.core._ctx is None, "the late connect made UCX a context after the reset"
    finally:
        server.close()


@pytest.mark.asyncio
async def test_cancelled_recv_breaks_the_connection(pair):
    conn = await connect_to(pair)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(conn.recv(), 0.05)
    assert conn.closed  # its frame might have been half read
    with pytest.raises(TransportError):
        await asyncio.wait_for(conn.send(b"x"), BOUND_S)


@pytest.mark.asyncio
async def test_connect_to_dead_port_fails(pair):
    _, client = pair
    with pytest.raises(TransportError):
        await asyncio.wait_for(client.connect(f"127.0.0.1:{free_port()}", timeout=1.0), BOUND_S)


@pytest.mark.asyncio
async def test_connect_rejects_bad_address(pair):
    _, client = pair
    with pytest.raises(TransportError, match="host:port"):
        await client.connect("no-port-here")


@pytest.mark.asyncio
async def test_two_processes_exchange_then_peer_dies(pair, name):
    _, client = pair
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, name, stdout=asyncio.subprocess.PIPE, cwd=ROOT
    )
    try:
        address = await asyncio.wait_for(read_address(child), 60)
        conn = await asyncio.wait_for(client.connect(address), BOUND_S)
        for seed in range(1, 7):  # with rings: each side offers at its second, and uses its ring from its fourth
            payload = random_bytes(16 * MiB, seed=seed)
            await asyncio.wait_for(conn.send(b"big", payload), BOUND_S)
            header, back = await asyncio.wait_for(conn.recv(), BOUND_S)
            assert header == b"big"
            np.testing.assert_array_equal(back, np.bitwise_not(payload))
        if client.warm:
            assert conn.ring_frames["sent"] >= 1 and conn.ring_frames["received"] >= 1, conn.ring_frames

        os.kill(child.pid, signal.SIGKILL)
        await asyncio.wait_for(child.wait(), BOUND_S)
        with pytest.raises(TransportError):
            await asyncio.wait_for(conn.recv(), BOUND_S)
        with pytest.raises(TransportError):
            await asyncio.wait_for(conn.send(b"anyone?", payload), BOUND_S)
        await conn.close()
        left = [f for f in os.listdir("/dev/shm") if f.startswith((f"dejavu-kv-{os.getpid()}-", f"dejavu-kv-{child.pid}-"))]
        assert not left, left  # each ring file went once the other side had mapped it
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


@functools.cache
def a_child_reads_its_parent() -> bool:
    """Whether this host lets a process read its parent's memory (not under Yama's ptrace_scope 1
    or more, nor a seccomp profile that blocks process_vm_readv): the two-process test's peer must."""
    if not CMA_SUPPORTED:
        return False
    probe = np.frombuffer(bytearray(b"dejavu-probe-16b"), dtype=np.uint8)
    code = (f"import numpy as np; from common.kv.shm import vm_read; b = np.zeros(16, np.uint8); "
            f"vm_read({os.getpid()}, {probe.ctypes.data}, b); print(b.tobytes() == {probe.tobytes()!r})")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    return run.stdout.strip() == "True"


@pytest.mark.skipif(not a_child_reads_its_parent(), reason="this host does not let a process read its parent's memory")
@pytest.mark.parametrize("base", TRANSPORTS)
@pytest.mark.asyncio
async def test_two_processes_stream_payloads_read_from_the_senders_memory_then_peer_dies(base):
    """A sender that streams with a reader of its own (as common/kv/peers.py): once the peer has
    taken its offer, the peer process reads each large payload from this one's memory; two in
    flight at a time. Then the peer is killed: the reader and the next send fail."""
    client, reader = transport_of(f"{base}+cma"), None
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, f"{base}+cma", stdout=asyncio.subprocess.PIPE, cwd=ROOT
    )
    try:
        address = await asyncio.wait_for(read_address(child), 60)
        conn = await asyncio.wait_for(client.connect(address), BOUND_S)
        conn.keep_reading()
        echoes: asyncio.Queue = asyncio.Queue()

        async def read():
            while True:
                echoes.put_nowait(await conn.recv())

        reader = asyncio.ensure_future(read())
        for seed in range(8):  # until the peer has taken the offer (at the second large payload) and read one
            await asyncio.wait_for(conn.send(b"warm", random_bytes(shm.CMA_MIN_BYTES, seed=seed)), BOUND_S)
            await asyncio.wait_for(echoes.get(), BOUND_S)
            if conn.cma_frames["sent"]:
                break
        before = conn.cma_frames["sent"]
        sent = [random_bytes(16 * MiB, seed=seed) for seed in range(8)]
        window = asyncio.Semaphore(2)

        async def one(i):
            async with window:
                await asyncio.wait_for(conn.send(b"big-%d" % i, sent[i]), BOUND_S)

        await asyncio.gather(*(one(i) for i in range(len(sent))))  # 2 sends waiting at most (in either order)
        got = dict([await asyncio.wait_for(echoes.get(), BOUND_S) for _ in sent])
        for i, payload in enumerate(sent):
            np.testing.assert_array_equal(got[b"big-%d" % i], np.bitwise_not(payload))
        assert conn.cma_frames["sent"] - before == len(sent), conn.cma_frames  # every one read from our memory
        os.kill(child.pid, signal.SIGKILL)
        await asyncio.wait_for(child.wait(), BOUND_S)
        with pytest.raises(TransportError):
            await asyncio.wait_for(reader, BOUND_S)
        with pytest.raises(TransportError):
            await asyncio.wait_for(conn.send(b"anyone?", sent[0]), BOUND_S)
        await conn.close()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        if reader is not None and not reader.done():
            reader.cancel()
        await client.close()


async def read_address(child: asyncio.subprocess.Process) -> str:
    while line := await child.stdout.readline():
        if line.startswith(b"LISTENING "):
            return line.split()[1].decode()
    raise RuntimeError(f"peer exited ({await child.wait()}) before listening")


async def serve(name: str) -> None:
    transport = transport_of(name)
    address = await transport.listen(inverting_echo, "127.0.0.1")
    print("LISTENING", address, flush=True)
    try:
        await asyncio.Event().wait()  # until killed
    finally:
        await transport.close()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))


def test_network_device_is_the_one_with_the_address():
    """UCX's own sockets are kept to --host's device (UCX_NET_DEVICES): the device found for each
    of this machine's addresses is the one psutil lists it under; no device for 0.0.0.0 / ::."""
    import psutil

    from common.kv import network_device

    assert network_device("127.0.0.1") == "lo" and network_device("::1") == "lo"
    assert network_device("0.0.0.0") is None and network_device("::") is None
    families = (socket.AF_INET, socket.AF_INET6)
    if not any(a.address == "203.0.113.77" for addrs in psutil.net_if_addrs().values() for a in addrs):
        assert network_device("203.0.113.77") is None  # TEST-NET-3: no device of ours has it
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            address = a.address.split("%")[0]  # fe80::1%eth0
            if a.family in families and not address.startswith(("127.", "::1", "fe80:")):
                assert network_device(address) == name, (address, name)


@pytest.mark.asyncio
async def test_closing_a_transport_while_it_serves_logs_no_error(pair):
    """Its handlers are cancelled and end quietly. (Over UCX the handler runs as asyncio's
    start_server task: re-raising the cancellation made Python 3.11's callback ask a cancelled task
    for its exception, and the loop logged a CancelledError traceback at every service's stop.)"""
    loop = asyncio.get_running_loop()
    errors = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        conn = await connect_to(pair)
        await asyncio.wait_for(conn.send(b"ping", random_bytes(64)), BOUND_S)
        await asyncio.wait_for(conn.recv(), BOUND_S)  # the handler is up, waiting for the next frame
        await asyncio.wait_for(pair[0].close(), BOUND_S)
        for _ in range(5):
            await asyncio.sleep(0.02)  # the tasks' callbacks run
    finally:
        loop.set_exception_handler(previous)
    assert not errors, [c.get("message") for c in errors]
