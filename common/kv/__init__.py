"""KV-cache transfer between services: transports (UCX, TCP) and the message format on top.

    transport = make_transport("ucx")            # in the service's lifespan, after any fork
    address = await transport.listen(on_conn, host)   # receiver
    conn = await transport.connect(address)            # sender
    await stream_out(conn, kv, request_id=..., epoch=..., layer_start=..., ...)
    header, kv = await stream_in(conn)
    await transport.close()
"""

import os

from common.kv.transport import Connection, Transport, TransportError
from common.kv.wire import Header, WireError, send_ack, send_error, send_fetch, stream_in, stream_out
from common.settings import is_loopback

TRANSPORTS = ("ucx", "tcp")

__all__ = [
    "Connection",
    "Header",
    "TRANSPORTS",
    "Transport",
    "TransportError",
    "WireError",
    "make_transport",
    "send_ack",
    "send_error",
    "send_fetch",
    "stream_in",
    "stream_out",
]


def make_transport(name: str, token: str = "", host: str = "") -> Transport:
    """A new, idle transport by name: "ucx" or "tcp", with the cluster token's handshake on every
    connection when `token` is given (common/kv/auth.py). Call inside the process that uses it.

    `host`: the interface the service was told to use. UCX's own TCP transport otherwise opens its
    sockets on every network device; on a loopback host it is kept to `lo` (UCX_NET_DEVICES, unless
    set). The UCX transport's own listener is a TCP rendezvous on `host` (common/kv/ucx.py)."""
    from common.kv.auth import authenticated

    if name == "ucx":
        if host and is_loopback(host):
            os.environ.setdefault("UCX_NET_DEVICES", "lo")
        from common.kv.ucx import UcxTransport  # imports ucxx: only when asked for

        return authenticated(UcxTransport(token), token)
    if name == "tcp":
        from common.kv.tcp import TcpTransport

        return authenticated(TcpTransport(), token)
    raise ValueError(f"unknown KV transport {name!r}: choose one of {', '.join(TRANSPORTS)}")
