"""KV-cache transfer between services: transports (UCX, TCP) and the message format on top.

    transport = make_transport("ucx")            # in the service's lifespan, after any fork
    address = await transport.listen(on_conn, host)   # receiver
    conn = await transport.connect(address)            # sender
    await stream_out(conn, kv, request_id=..., epoch=..., layer_start=..., ...)
    header, kv = await stream_in(conn)
    await transport.close()
"""

from common.kv.transport import Connection, Transport, TransportError
from common.kv.wire import Header, WireError, send_ack, send_error, send_fetch, stream_in, stream_out

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


def make_transport(name: str) -> Transport:
    """A new, idle transport by name: "ucx" or "tcp". Call inside the process that uses it."""
    if name == "ucx":
        from common.kv.ucx import UcxTransport  # imports ucxx: only when asked for

        return UcxTransport()
    if name == "tcp":
        from common.kv.tcp import TcpTransport

        return TcpTransport()
    raise ValueError(f"unknown KV transport {name!r}: choose one of {', '.join(TRANSPORTS)}")
