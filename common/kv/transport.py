"""The KV transport contract: one interface, two implementations (UCX, asyncio TCP).

Tensors move only over a transport; control messages go over HTTP. A transport carries
*frames*: one small header (bytes) plus one contiguous payload (bytes-like, may be empty),
delivered whole and in order on a connection. Connections are bidirectional: the receiver of
KV answers with acknowledgement frames on the same connection.

Who calls what:
- a service calls `listen()` once at start-up (inside its asyncio loop, i.e. the FastAPI
  lifespan: UCX must be initialised per process, after any fork) and advertises the address;
- a sender calls `connect(address)` and keeps the connection for many messages;
- `Connection.send` may be called by many tasks at once: each frame is sent atomically.
- `Connection.recv` is called by a single reader task per connection, which should always be
  reading: with UCX a large send completes only once the peer has received it.
- Cancelling a `send` or `recv` that has started breaks the connection (`closed` becomes True):
  its frame may be half sent or half read.
"""

from __future__ import annotations

import abc
import logging
import socket
import struct
from collections.abc import Awaitable, Callable

import numpy as np

logger = logging.getLogger(__name__)

# Given the header of an incoming frame and its payload size in bytes, return a writable,
# C-contiguous uint8 numpy array of exactly that size to receive the payload into (zero-copy
# where the transport allows it). Called once per frame, before the payload is read.
Allocator = Callable[[bytes, int], np.ndarray]

# Both implementations open a frame with (header_len, payload_len): uint64 little endian, 16 bytes.
FRAME_PREFIX = struct.Struct("<QQ")
# The longest header a frame carries, on both transports: UCX sends the prefix and the header as one
# message of at most 64 KiB (common/kv/ucx.py). Sending a longer one is a ValueError, before anything
# is sent; receiving one means a corrupt stream or a broken peer: the link ends. Real headers are
# well under 1 KiB (common/kv/wire.py).
MAX_HEADER_LEN = (64 << 10) - FRAME_PREFIX.size


class TransportError(Exception):
    """The peer is gone, the connection broke, or a frame was malformed."""


class Connection(abc.ABC):
    @abc.abstractmethod
    async def send(self, header: bytes, payload: np.ndarray | memoryview | bytes | None = None) -> None:
        """Send one frame. Returns once the payload buffer may be reused. Raises TransportError, or
        ValueError for a header over MAX_HEADER_LEN (nothing sent, the connection goes on)."""

    @abc.abstractmethod
    async def recv(self, alloc: Allocator | None = None) -> tuple[bytes, np.ndarray]:
        """Receive one frame: (header, payload as uint8 array). Raises TransportError on EOF/break."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close; idempotent. A pending recv on either side then raises TransportError."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool: ...

    def keep_reading(self) -> None:
        """The owner's promise that a task of its own reads this connection until it closes (as
        common/kv/peers.py's PeerLink does): a layer may then make a large send wait for an answer
        only that reader takes (common/kv/shm.py: payloads read from the sender's memory). A
        connection whose reader stops while such a send waits would wait forever."""


Handler = Callable[[Connection], Awaitable[None]]


class Transport(abc.ABC):
    name: str

    @abc.abstractmethod
    async def listen(self, handler: Handler, host: str, port: int = 0) -> str:
        """Accept connections; run `handler(conn)` as a task for each. Returns the address
        ("host:port") that peers pass to `connect`. port=0 picks a free port."""

    @abc.abstractmethod
    async def connect(self, address: str, timeout: float = 5.0) -> Connection:
        """Open a connection to a listening peer. Raises TransportError if it can't."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop listening and close every connection; the process may then exit cleanly."""


# Helpers shared by the implementations.


def default_alloc(header: bytes, nbytes: int) -> np.ndarray:
    """The allocator used when the caller passes none: a fresh uint8 array."""
    return np.empty(nbytes, dtype=np.uint8)


def as_bytes(payload: np.ndarray | memoryview | bytes | None) -> np.ndarray:
    """A flat uint8 view of a payload, no copy for a contiguous one (ucxx takes numpy but refuses
    torch tensors); None: an empty one."""
    if payload is None:
        return np.empty(0, dtype=np.uint8)
    if isinstance(payload, np.ndarray):
        return payload.reshape(-1).view(np.uint8)
    return np.frombuffer(payload, dtype=np.uint8)


def check_header(header: bytes) -> None:
    if len(header) > MAX_HEADER_LEN:
        raise ValueError(f"a frame header of {len(header)} bytes: the most is {MAX_HEADER_LEN}")


def checked_buffer(alloc: Allocator, header: bytes, nbytes: int) -> np.ndarray:
    """Call `alloc` and check that its array keeps the Allocator contract."""
    buf = alloc(header, nbytes)
    if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.shape != (nbytes,):
        raise TransportError(f"allocator must return a uint8 array of shape ({nbytes},)")
    if not (buf.flags.c_contiguous and buf.flags.writeable):
        raise TransportError("allocator must return a writable, C-contiguous array")
    return buf


def split_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port); raises TransportError on anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise TransportError(f"bad transport address {address!r}: expected 'host:port'")
    return host, int(port)


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on `host` only ("::": every interface, IPv6 and IPv4 alike, as the
    HTTP server binds it). Raises OSError."""
    if host == "::":
        return socket.create_server((host, port), family=socket.AF_INET6, backlog=128,
                                    dualstack_ipv6=socket.has_dualstack_ipv6())
    return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=128)


async def serve(handler: Handler, conn: Connection, transport: str) -> None:
    """Run `handler` on an accepted connection, log how it ended, and always close the connection."""
    try:
        await handler(conn)
    except TransportError as e:
        logger.info("%s connection handler ended: %s", transport, e)
    except Exception:
        logger.exception("%s connection handler failed", transport)
    finally:
        await conn.close()
