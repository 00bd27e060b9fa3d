"""Issue #10 item 13: the KV receive path (common/kv/receiver.py) against hostile frames, over
both transports. A malformed header (70 dims, a wrong nbytes, an unknown dtype, a missing or extra
field) is answered with an error frame the sender's PeerLink matches to its send, when its request
id, epoch and ranges are valid; one without them (JSON nested 10,000 deep, not JSON, a bad request
id) is skipped. Either way the shared link stays up for the next good message. A frame claiming
more payload than the receiver could ever legitimately take closes that link unread, and the
listener serves on."""

from __future__ import annotations

import asyncio
import json
import re

import numpy as np
import pytest

from common.kv import TRANSPORTS, make_transport
from common.kv.peers import KVRejected, PeerLink
from common.kv.receiver import kv_server
from common.kv.transport import FRAME_PREFIX, Connection
from common.kv.wire import stream_in, stream_out

pytestmark = pytest.mark.asyncio
BOUND_S = 5.0  # bound on waits that must not hang; never asserted as a latency
GOOD = dict(request_id="r", epoch=0, layer_start=0, layer_end=1, token_start=0, token_end=4)


async def receiver(kind: str, max_payload: int = 1 << 20):
    stored = []
    server = make_transport(kind)
    handler = kv_server(lambda h, payload: stored.append(h.request_id), (), max_payload=max_payload)
    return server, await server.listen(handler, "127.0.0.1"), stored


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_malformed_headers_are_answered_or_skipped_and_the_link_stays_up(kind):
    server, address, stored = await receiver(kind)
    client = make_transport(kind)
    try:
        conn = await client.connect(address)
        seventy_dims = {**GOOD, "kind": "kv", "dtype": "uint8", "shape": [1] * 70, "nbytes": 1, "checksum": 0,
                        "message": ""}
        unanswerable = [b"[" * 10_000 + b"]" * 10_000, b"\xff\xfenot json",
                        json.dumps({**seventy_dims, "request_id": "r\nforged log line"}).encode(),
                        json.dumps({**seventy_dims, "layer_start": True}).encode(),
                        json.dumps({**seventy_dims, "token_start": -1}).encode()]
        for header in [json.dumps({**seventy_dims, "token_start": 2}).encode(), *unanswerable]:
            await conn.send(header, np.zeros(1, dtype=np.uint8))
        await stream_out(conn, np.ones((1, 2, 4), dtype=np.float32), **GOOD)
        error, _ = await asyncio.wait_for(stream_in(conn), BOUND_S)
        assert (error.kind, error.request_id, error.token_start) == ("error", "r", 2)
        assert "at most 8 dims" in error.message
        ack, _ = await asyncio.wait_for(stream_in(conn), BOUND_S)  # no answer to the others in between
        assert ack.kind == "ack" and stored == ["r"]
    finally:
        await client.close()
        await server.close()


class Corrupting(Connection):
    """A real transport connection that rewrites the header of the frames it sends with
    `corrupt(fields)` while that is set: a sender with a bug, or a header damaged on its way."""

    def __init__(self, conn: Connection):
        self.conn, self.corrupt = conn, None

    async def send(self, header, payload=None):
        if self.corrupt is not None:
            fields = json.loads(header)
            self.corrupt(fields)
            header = json.dumps(fields).encode()
        await self.conn.send(header, payload)

    async def recv(self, alloc=None):
        return await self.conn.recv(alloc)

    async def close(self):
        await self.conn.close()

    @property
    def closed(self):
        return self.conn.closed


CORRUPTIONS = {  # what breaks the header -> what the error frame says
    "shape": (lambda f: f.update(shape=[4, -2, 1]), "bad shape (4, -2, 1)"),
    "dims": (lambda f: f.update(shape=[1] * 9), "at most 8 dims"),
    "nbytes": (lambda f: f.update(nbytes=f["nbytes"] + 4), "nbytes 36 != 32 for float32(1, 2, 4)"),
    "dtype": (lambda f: f.update(dtype="bfloat17"), "unknown dtype 'bfloat17'"),
    "missing": (lambda f: f.pop("checksum"), "missing: ['checksum'], unexpected: []"),
    "extra": (lambda f: f.update(priority=1), "missing: [], unexpected: ['priority']"),
    "checksum": (lambda f: f.update(checksum=f["checksum"] ^ 1), "checksum mismatch"),
}


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_the_sender_learns_its_frame_was_malformed_at_once_and_the_link_stays_up(kind):
    """A PeerLink's send whose header is broken on the way fails with KVRejected that says what was
    wrong, well before the sender's ack timeout (nothing answered it before: it waited 30 s); the
    next send on that link is stored and acknowledged."""
    server, address, stored = await receiver(kind)
    client = make_transport(kind)
    conn = Corrupting(await client.connect(address))
    link = PeerLink(address, conn)
    try:
        for i, (corrupt, problem) in enumerate(CORRUPTIONS.values()):
            kv, fields = np.ones((1, 2, 4), dtype=np.float32), {**GOOD, "token_start": i, "token_end": 4 + i}
            conn.corrupt = corrupt
            ack = await link.send(kv, **fields)
            with pytest.raises(KVRejected, match=re.escape(problem)) as rejected:
                await asyncio.wait_for(ack, BOUND_S)
            assert str(rejected.value).startswith("malformed KV message: ")
            conn.corrupt = None
            ack = await link.send(kv, **fields)
            assert (await asyncio.wait_for(ack, BOUND_S)).kind == "ack"
        assert stored == ["r"] * len(CORRUPTIONS) and not conn.closed and link.waiting == {}
    finally:
        await link.close()
        await client.close()
        await server.close()


async def test_a_frame_over_the_receivers_limit_closes_its_link_unread():
    """Raw TCP (frames as bytes): a header claiming a terabyte of payload."""
    server, address, stored = await receiver("tcp", max_payload=1 << 20)
    try:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        header = json.dumps({**GOOD, "kind": "kv", "dtype": "uint8", "shape": [1 << 40], "nbytes": 1 << 40,
                             "checksum": 0, "message": ""}).encode()
        writer.write(FRAME_PREFIX.pack(len(header), 1 << 40) + header + b"\0" * 4096)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), BOUND_S) == b""  # closed, nothing answered
        writer.close()
        client = make_transport("tcp")
        try:  # the listener serves the next peer
            conn = await client.connect(address)
            await stream_out(conn, np.ones((1, 2, 4), dtype=np.float32), **GOOD)
            assert (await asyncio.wait_for(stream_in(conn), BOUND_S))[0].kind == "ack" and stored == ["r"]
        finally:
            await client.close()
    finally:
        await server.close()


async def test_links_to_peers_that_went_away_are_forgotten():
    """Issue #10 item 16: Peers keeps one link per address; a peer that is gone (a store or token
    service that died, its address never used again) leaves no link or lock behind."""
    from common.kv.peers import Peers

    client = make_transport("tcp")
    peers = Peers(client)
    try:
        gone, gone_address, _ = await receiver("tcp")
        await peers.get(gone_address)
        await gone.close()  # the peer goes away; its link breaks
        for _ in range(50):
            if peers.links[gone_address].reader.done():
                break
            await asyncio.sleep(0.05)
        alive, alive_address, _ = await receiver("tcp")
        try:
            await peers.get(alive_address)
            assert list(peers.links) == [alive_address] and list(peers.locks) == [alive_address]
        finally:
            await alive.close()
    finally:
        await peers.close()
        await client.close()


async def test_a_links_lines_name_no_request_after_its_frames_are_answered(caplog_ids):
    """The receiver names each frame's request in the lines about it; the link's own lines after
    (a malformed frame, the link dropped) are no request's. The id was left set, so they named the
    last frame's request. And a sender's link, opened for one request's frame, outlives it: its
    reader (and the transport's tasks for it) run in a context of their own."""
    import logging

    from common.kv import peers as peers_module
    from common.kv.peers import Peers
    from common.service import request_id_var

    server = make_transport("tcp")
    stored = []
    address = await server.listen(kv_server(lambda h, payload: stored.append(h.request_id), (), request_id_var),
                                  "127.0.0.1")
    client = make_transport("tcp")
    opened_under = []

    class Recorded(PeerLink):
        def __init__(self, *args, **kwargs):
            opened_under.append(request_id_var.get())
            super().__init__(*args, **kwargs)

    peers = Peers(client)
    try:
        with caplog_ids.at_level(logging.INFO, logger="common.kv.receiver"):
            conn = await client.connect(address)
            await stream_out(conn, np.ones((1, 2, 4), dtype=np.float32), **GOOD)
            ack, _ = await asyncio.wait_for(stream_in(conn), BOUND_S)
            assert ack.kind == "ack" and stored == ["r"]
            await conn.send(b"\xff\xfenot json", np.zeros(1, dtype=np.uint8))
            await stream_out(conn, np.ones((1, 2, 4), dtype=np.float32), **{**GOOD, "request_id": "r2"})
            await asyncio.wait_for(stream_in(conn), BOUND_S)  # the second good frame's ack: the bad one was read
        [malformed] = [r for r in caplog_ids.records if r.getMessage().startswith("malformed KV message")]
        assert malformed.request_id == "-"

        peers_module.PeerLink, before = Recorded, peers_module.PeerLink
        as_request = request_id_var.set("req-opener")
        try:
            await peers.get(address)
        finally:
            request_id_var.reset(as_request)
            peers_module.PeerLink = before
        assert opened_under == ["-"]
    finally:
        await peers.close()
        await client.close()
        await server.close()
