"""The listening socket every service serves HTTP on (common.service.bind): connections accepted on
it send small writes at once (TCP_NODELAY). Without it each response on a kept-alive connection (a
/reserve, each line of a decode stream, each SSE chunk) waited ~40 ms on Nagle's algorithm and the
peer's delayed ACK: every internal call took 44 ms instead of ~1.5."""

import asyncio
import socket

import pytest

from common.service import bind


@pytest.mark.asyncio
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_connections_accepted_on_a_service_socket_have_nodelay(host):
    try:
        sock = bind(host, 0)
    except OSError:
        pytest.skip(f"no {host} here")
    accepted = asyncio.get_running_loop().create_future()

    async def on_connection(reader, writer):  # as uvicorn serves it: loop.create_server(sock=...)
        accepted.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connection, sock=sock)
    try:
        _, writer = await asyncio.open_connection(host, sock.getsockname()[1])
        assert await asyncio.wait_for(accepted, 5) != 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
