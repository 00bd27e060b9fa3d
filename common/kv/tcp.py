"""KV transport over plain asyncio TCP sockets: the fallback when UCX is unavailable.

Frame on the byte stream (all integers little endian):

    uint64 header_len | uint64 payload_len | header (header_len bytes) | payload (payload_len bytes)

The payload is read with `loop.sock_recv_into` straight into the array the allocator returns, so
a frame is copied once, by the kernel (asyncio streams' `readexactly` measured 4x slower here).
Sends on one connection are serialized with a lock so concurrent tasks never interleave frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

import numpy as np

from common.kv.transport import (
    FRAME_PREFIX,
    MAX_HEADER_LEN,
    Allocator,
    Connection,
    Handler,
    Transport,
    TransportError,
    check_header,
    checked_buffer,
    default_alloc,
    listening_socket,
    serve,
    split_address,
)

logger = logging.getLogger(__name__)

_CLOSE_GRACE_S = 1.0  # how long close() waits for in-flight socket calls to wake


class TcpConnection(Connection):
    """One connected, non-blocking TCP socket."""

    def __init__(self, sock: socket.socket, on_close: Callable[[TcpConnection], None] | None = None):
        """Takes ownership of a connected socket; `on_close(self)` runs once it is closed."""
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._on_close = on_close  # lets the transport forget this connection
        self._loop = asyncio.get_running_loop()
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._broken = False
        self._inflight = 0  # tasks inside a socket call right now
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def closed(self) -> bool:
        return self._closed or self._broken

    async def send(self, header: bytes, payload: np.ndarray | memoryview | bytes | None = None) -> None:
        body = memoryview(b"" if payload is None else payload).cast("B")
        check_header(header)
        prefix = FRAME_PREFIX.pack(len(header), body.nbytes)
        async with self._send_lock:
            with self._io("send"):
                await self._loop.sock_sendall(self._sock, prefix + header)
                if body.nbytes:
                    await self._loop.sock_sendall(self._sock, body)

    async def recv(self, alloc: Allocator | None = None) -> tuple[bytes, np.ndarray]:
        with self._io("recv"):
            prefix = bytearray(FRAME_PREFIX.size)
            await self._recv_exactly(memoryview(prefix))
            header_len, payload_len = FRAME_PREFIX.unpack(prefix)
            if header_len > MAX_HEADER_LEN:
                raise TransportError(f"header of {header_len} bytes: stream is corrupt")
            header = bytearray(header_len)
            await self._recv_exactly(memoryview(header))
            payload = checked_buffer(alloc or default_alloc, bytes(header), payload_len)
            await self._recv_exactly(memoryview(payload))
            return bytes(header), payload

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        # The shutdown wakes any task blocked in a socket call. Closing the fd before they have
        # woken would strand them: epoll silently forgets a closed fd, so they would wait forever.
        if self._inflight:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), _CLOSE_GRACE_S)
        self._sock.close()
        if self._on_close is not None:
            self._on_close(self)

    async def _recv_exactly(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = await self._loop.sock_recv_into(self._sock, view[got:])
            if n == 0:
                raise TransportError("connection closed by peer")
            got += n

    @contextlib.contextmanager
    def _io(self, what: str):
        """Count a socket call in flight and turn socket errors into TransportError."""
        if self.closed:  # once broken, always broken: the peer is gone or the stream corrupt
            raise TransportError(f"{what} on a {'closed' if self._closed else 'broken'} connection")
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        except OSError as e:
            self._broken = True
            raise TransportError(f"{what} failed: {e}") from e
        except BaseException:
            # Out of step for good: the peer is gone, or a frame is half sent or half read
            # (cancelled, or the allocator failed).
            self._broken = True
            raise
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()


class TcpTransport(Transport):
    """Listens on one TCP socket and opens one TCP socket per `connect`."""

    name = "tcp"

    def __init__(self) -> None:
        self._server: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None
        self._handlers: set[asyncio.Task] = set()
        self._conns: set[TcpConnection] = set()

    async def listen(self, handler: Handler, host: str, port: int = 0) -> str:
        if self._server is not None:
            raise TransportError("already listening")
        server = listening_socket(host, port)
        server.setblocking(False)
        self._server = server
        self._accept_task = asyncio.create_task(self._accept_loop(handler), name="kv-tcp-accept")
        address = f"{host}:{server.getsockname()[1]}"
        logger.info("tcp transport listening on %s", address)
        return address

    async def connect(self, address: str, timeout: float = 5.0) -> Connection:
        host, port = split_address(address)
        try:
            sock = await asyncio.wait_for(self._open(host, port), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise TransportError(f"cannot connect to {address}: {e!r}") from e
        return self._track(sock)

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            await conn.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        self._server = self._accept_task = None

    async def _open(self, host: str, port: int) -> socket.socket:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, type_, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _accept_loop(self, handler: Handler) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(self._server)
            except OSError:
                # e.g. EMFILE: transient, so keep the listener alive rather than go deaf.
                logger.exception("tcp transport accept failed")
                await asyncio.sleep(0.1)
                continue
            logger.debug("tcp transport accepted %s", peer)
            conn = self._track(sock)
            task = asyncio.create_task(serve(handler, conn, "tcp"), name=f"kv-tcp-{peer}")
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    def _track(self, sock: socket.socket) -> TcpConnection:
        conn = TcpConnection(sock, on_close=self._conns.discard)
        self._conns.add(conn)
        return conn
