"""KV-cache transfer between services: transports (UCX, TCP) and the message format on top.

    transport = make_transport("ucx")            # in the service's lifespan, after any fork
    address = await transport.listen(on_conn, host)   # receiver
    conn = await transport.connect(address)            # sender
    await stream_out(conn, kv, request_id=..., epoch=..., layer_start=..., ...)
    header, kv = await stream_in(conn)
    await transport.close()
"""

import ipaddress
import os
import socket
import struct

from common.kv.shm import CMA_MIN_BYTES, DEFAULT_RING_BYTES, MIN_BYTES, same_host
from common.kv.transport import Connection, Transport, TransportError
from common.kv.wire import Header, WireError, send_ack, send_error, send_fetch, stream_in, stream_out
from common.settings import KVSettings, is_loopback

TRANSPORTS = ("ucx", "tcp")

__all__ = [
    "Connection",
    "Header",
    "TRANSPORTS",
    "Transport",
    "TransportError",
    "WireError",
    "make_transport",
    "transport_for",
    "send_ack",
    "send_error",
    "send_fetch",
    "stream_in",
    "stream_out",
]


def transport_for(settings: KVSettings) -> Transport:
    """A service's transport, as its settings say."""
    return make_transport(settings.kv_transport, settings.cluster_token, settings.host,
                          settings.kv_shm_mib << 20, settings.kv_shm_min_kib << 10, settings.kv_cma)


def make_transport(name: str, token: str = "", host: str = "", ring_bytes: int = DEFAULT_RING_BYTES,
                   ring_min_bytes: int = MIN_BYTES, cma: bool = True, cma_min_bytes: int = CMA_MIN_BYTES) -> Transport:
    """A new, idle transport by name: "ucx" or "tcp", with the cluster token's handshake on every
    connection when `token` is given (common/kv/auth.py), and payloads of `ring_min_bytes` or more,
    when both ends are on one host, through a shared-memory ring of `ring_bytes` each way (0: never),
    those of `cma_min_bytes` or more read straight from the sender's memory instead where it can be
    (`cma`; common/kv/shm.py). Call inside the process that uses it.

    `host`: the interface the service was told to use. UCX's own TCP transport otherwise opens its
    sockets on every network device: it is kept to the device that has `host`'s address
    (UCX_NET_DEVICES, unless set; `lo` for a loopback host; every device for 0.0.0.0 or ::). Note
    that this also keeps UCX off other devices, RDMA ones included: set UCX_NET_DEVICES yourself
    to use them. The UCX transport's own listener is a TCP rendezvous on `host` (common/kv/ucx.py)."""
    from common.kv.auth import authenticated

    if name == "ucx":
        device = network_device(host) if host else None
        if device:
            os.environ.setdefault("UCX_NET_DEVICES", device)
        from common.kv.ucx import UcxTransport  # imports ucxx: only when asked for

        return same_host(authenticated(UcxTransport(token), token), ring_bytes, ring_min_bytes, cma, cma_min_bytes)
    if name == "tcp":
        from common.kv.tcp import TcpTransport

        return same_host(authenticated(TcpTransport(), token), ring_bytes, ring_min_bytes, cma, cma_min_bytes)
    raise ValueError(f"unknown KV transport {name!r}: choose one of {', '.join(TRANSPORTS)}")


SIOCGIFADDR = 0x8915  # Linux: an interface's (primary) IPv4 address


def network_device(host: str) -> str | None:
    """The network device (e.g. "eth0") that has address `host`: "lo" for a loopback host, None for
    every interface (0.0.0.0, ::), a host name, or an address no device has (Linux only)."""
    if is_loopback(host):
        return "lo"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if address.is_unspecified:
        return None
    if address.version == 6:
        try:
            with open("/proc/net/if_inet6") as f:  # address (32 hex digits), index, prefix, scope, flags, name
                for line in f:
                    fields = line.split()
                    if len(fields) == 6 and ipaddress.IPv6Address(int(fields[0], 16)) == address:
                        return fields[5]
        except OSError:
            pass
        return None
    try:
        import fcntl  # POSIX only
    except ImportError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
            if socket.inet_ntoa(raw[20:24]) == str(address):
                return name
    return None
