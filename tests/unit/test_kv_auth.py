"""The KV link's handshake (common/kv/auth.py) over both transports: only a peer with the cluster
token reaches the handler; a wrong token, no handshake at all, or a hostile first frame gets the
connection closed, and the listener keeps serving the next peer."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from common.kv import TRANSPORTS, TransportError, make_transport
from common.kv.auth import HELLO_TIMEOUT_S
from common.kv.transport import FRAME_PREFIX

pytestmark = pytest.mark.asyncio
BOUND_S = 5.0  # bound on waits that must not hang; never asserted as a latency


@pytest.fixture(params=TRANSPORTS)
def kind(request):
    return request.param


async def serving(kind: str, token: str):
    server, reached = make_transport(kind, token), asyncio.Queue()

    async def handler(conn) -> None:
        header, payload = await conn.recv()
        reached.put_nowait(header)
        await conn.send(b"echo:" + header)
        await asyncio.Event().wait()

    return server, await server.listen(handler, "127.0.0.1"), reached


async def test_the_same_token_reaches_the_handler_and_others_never_do(kind):
    server, address, reached = await serving(kind, "s3cret-token")
    clients = []
    try:
        for wrong in ("wrong-token", "s3cret-token-", "s3cret-toke"):
            client = make_transport(kind, wrong)
            clients.append(client)
            with pytest.raises(TransportError, match="refused this service's cluster token"):
                await asyncio.wait_for(client.connect(address), BOUND_S)
        bare = make_transport(kind)  # no token at all
        clients.append(bare)
        if kind == "ucx":  # the rendezvous asks for the token before any UCX endpoint exists
            with pytest.raises(TransportError, match="refused this service's cluster token"):
                await asyncio.wait_for(bare.connect(address), BOUND_S)
        else:  # no handshake: its first frame is taken as one, and refused
            conn = await bare.connect(address)
            await conn.send(b'{"kind": "kv", "request_id": "r"}', np.zeros(16, dtype=np.uint8))
            with pytest.raises(TransportError):
                await asyncio.wait_for(conn.recv(), BOUND_S)  # closed on it
        good = make_transport(kind, "s3cret-token")
        clients.append(good)
        conn = await asyncio.wait_for(good.connect(address), BOUND_S)
        await conn.send(b"hello there")
        header, _ = await asyncio.wait_for(conn.recv(), BOUND_S)
        assert header == b"echo:hello there"
        assert reached.qsize() == 1 and reached.get_nowait() == b"hello there"  # only the good peer got through
    finally:
        for client in clients:
            await client.close()
        await server.close()


async def test_a_hostile_first_frame_is_dropped_without_allocating():
    """A raw TCP peer (a plain socket: frames as bytes) that claims 256 MiB of payload in its first
    frame, and sends none: closed at once, nothing allocated or waited for (an allocating listener
    would sit reading for HELLO_TIMEOUT_S); the listener still serves the next peer."""
    kind = "tcp"
    server, address, _ = await serving(kind, "tok")
    try:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(FRAME_PREFIX.pack(5, 256 << 20) + b"hello")  # "256 MiB follow"
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), HELLO_TIMEOUT_S / 2) == b""  # closed, not read from
        writer.close()
        good = make_transport(kind, "tok")
        try:
            conn = await asyncio.wait_for(good.connect(address), BOUND_S)
            await conn.send(b"ping")
            assert (await asyncio.wait_for(conn.recv(), BOUND_S))[0] == b"echo:ping"
        finally:
            await good.close()
    finally:
        await server.close()


@pytest.mark.parametrize("token", [b"wrong", b""], ids=["wrong-token", "no-token"])
async def test_a_stranger_never_gets_its_worker_address_to_ucx(token):
    """A raw TCP peer at the UCX transport's rendezvous, claiming a worker address of random bytes
    (which UCX would have to parse) without the right token: refused and closed before UCX sees the
    address; garbage that is no rendezvous at all is closed too. The listener serves the next peer."""
    from common.kv.ucx import MAGIC, REFUSED, RENDEZVOUS

    server, address, reached = await serving("ucx", "tok")
    try:
        host, port = address.rsplit(":", 1)
        bogus = np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()
        garbage = b"GET / HTTP/1.1\r\nHost: kv\r\nAccept: */*\r\n\r\n"  # longer than a rendezvous header
        for opening in (RENDEZVOUS.pack(MAGIC, 7, len(bogus), len(token)) + bogus + token, garbage):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(opening)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), BOUND_S)  # then closed
            assert answer in (RENDEZVOUS.pack(REFUSED, 0, 0, 0), b""), answer
            writer.close()
        good = make_transport("ucx", "tok")
        try:
            conn = await asyncio.wait_for(good.connect(address), BOUND_S)
            await conn.send(b"ping")
            assert (await asyncio.wait_for(conn.recv(), BOUND_S))[0] == b"echo:ping"
            assert reached.qsize() == 1
        finally:
            await good.close()
    finally:
        await server.close()
