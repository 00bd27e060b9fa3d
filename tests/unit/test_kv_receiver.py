"""Issue #10 item 13: the KV receive path (common/kv/receiver.py) against hostile frames, over
both transports. A malformed header (70 dims, JSON nested 10,000 deep, not JSON) gets skipped and
the shared link stays up for the next good message; a frame claiming more payload than the
receiver could ever legitimately take closes that link unread, and the listener serves on."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from common.kv import TRANSPORTS, make_transport
from common.kv.receiver import kv_server
from common.kv.transport import FRAME_PREFIX
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
async def test_malformed_headers_are_skipped_and_the_link_stays_up(kind):
    server, address, stored = await receiver(kind)
    client = make_transport(kind)
    try:
        conn = await client.connect(address)
        bad = [json.dumps({**GOOD, "kind": "kv", "dtype": "uint8", "shape": [1] * 70, "nbytes": 1, "checksum": 0,
                           "message": ""}).encode(),
               b"[" * 10_000 + b"]" * 10_000, b"\xff\xfenot json"]
        for header in bad:
            await conn.send(header, np.zeros(1, dtype=np.uint8))
        await stream_out(conn, np.ones((1, 2, 4), dtype=np.float32), **GOOD)
        ack, _ = await asyncio.wait_for(stream_in(conn), BOUND_S)
        assert ack.kind == "ack" and stored == ["r"]
    finally:
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
