"""KV transport over UCX, through `ucxx` (the maintained successor of ucx-py).

A frame is up to three tagged messages on one endpoint, matched in order by the receiver:

    1. prefix: 16 bytes, uint64 header_len | uint64 payload_len (little endian)
    2. header: header_len bytes
    3. payload: payload_len bytes, received straight into the allocator's array; not sent when 0

Lifecycle, per process:
1. `UcxTransport()` sets the UCX environment and imports ucxx. Never at module import: UCX
   initialised before a fork breaks the child, and ucxx reads the environment at import.
2. The first `listen`/`connect` initialises UCX inside the running event loop (ucxx binds its
   completion notifier thread to that loop).
3. `close()` closes every endpoint and the listener; the last open transport in the process
   stops the notifier thread and resets UCX, without which the process hangs at exit.

Error handling stays on for every endpoint, so a dead peer fails a pending recv or a send
within ~20 ms instead of hanging. The listener binds 0.0.0.0 (ucxx takes no host argument).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
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
    checked_buffer,
    default_alloc,
    split_address,
)

logger = logging.getLogger(__name__)

# Measured on loopback (see NOTES.md, UCX): the defaults stage rendezvous through CUDA memory
# and run ~4x slower on CPU. Python futures are not only ~2x faster: without them every pending
# recv is polled from the event loop, burning a whole core while a connection sits idle.
UCX_ENV = {
    "UCX_RNDV_FRAG_MEM_TYPE": "host",
    "UCX_RNDV_SCHEME": "put_zcopy",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
    "UCX_CM_REUSEADDR": "y",  # else a restarted service can't reuse its port for ~60 s
    "UCXPY_ENABLE_PYTHON_FUTURE": "1",
}


class _Runtime:
    """The process-wide ucxx context, shared by all UcxTransports of the process (ucxx has one)."""

    users = 0

    @classmethod
    def acquire(cls, ucxx) -> None:
        if cls.users == 0:
            ucxx.init()  # binds the notifier thread to the running loop
        cls.users += 1

    @classmethod
    def release(cls, ucxx) -> None:
        cls.users -= 1
        if cls.users:
            return
        _stop_notifier(ucxx)
        gc.collect()  # closed endpoints caught in reference cycles still pin the context
        try:
            ucxx.reset()
        except ucxx.exceptions.UCXError as e:
            logger.warning("UCX not reset, something still holds an endpoint: %s", e)


def _stop_notifier(ucxx) -> None:
    """Stop ucxx's notifier thread: not a daemon, so left running the interpreter never exits."""
    # ucxx.stop_notifier_thread() alone waits for the thread's next once-a-second poll; waking it
    # first makes close() take ms. The context is private, hence the getattr guards.
    ctx = getattr(ucxx.core, "_ctx", None)
    worker = ctx.worker if getattr(ctx, "notifier_thread", None) is not None else None
    if worker is not None:
        worker.stop_request_notifier_thread()
    ucxx.stop_notifier_thread()
    if worker is not None:
        # The thread consumed the stop flag on its way out; set it again, or the worker's
        # destructor takes the notifier for running and logs a warning.
        worker.stop_request_notifier_thread()


def import_ucxx():
    """Import ucxx after setting its environment (our values only where the user set none)."""
    for key, value in UCX_ENV.items():
        os.environ.setdefault(key, value)
    import ucxx

    return ucxx


def _as_bytes(buf: np.ndarray | memoryview | bytes) -> np.ndarray:
    """A flat uint8 view (no copy) for ucxx, which takes numpy but refuses torch tensors."""
    if isinstance(buf, np.ndarray):
        return buf.reshape(-1).view(np.uint8)
    return np.frombuffer(buf, dtype=np.uint8)


class UcxConnection(Connection):
    """One ucxx endpoint, from `create_endpoint` or accepted by the listener."""

    def __init__(self, ep, ucxx, on_close: Callable[[UcxConnection], None] | None = None):
        """Takes ownership of a ucxx Endpoint; `on_close(self)` runs once it is closed."""
        self._ep = ep
        self._errors = ucxx.exceptions.UCXError
        self._on_close = on_close  # lets the transport forget this connection
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._broken = False

    @property
    def closed(self) -> bool:
        return self._closed or self._broken

    async def send(self, header: bytes, payload: np.ndarray | memoryview | bytes | None = None) -> None:
        body = _as_bytes(b"" if payload is None else payload)
        prefix = np.frombuffer(FRAME_PREFIX.pack(len(header), body.nbytes), dtype=np.uint8)
        async with self._send_lock:
            with self._frame("send"):
                await self._call("send", prefix)
                await self._call("send", _as_bytes(header))
                if body.nbytes:
                    await self._call("send", body)

    async def recv(self, alloc: Allocator | None = None) -> tuple[bytes, np.ndarray]:
        with self._frame("recv"):
            prefix = np.empty(FRAME_PREFIX.size, dtype=np.uint8)
            await self._call("recv", prefix)
            header_len, payload_len = FRAME_PREFIX.unpack(prefix)
            if header_len > MAX_HEADER_LEN:
                raise TransportError(f"header of {header_len} bytes: stream is corrupt")
            header = np.empty(header_len, dtype=np.uint8)
            await self._call("recv", header)
            payload = checked_buffer(alloc or default_alloc, header.tobytes(), payload_len)
            if payload_len:
                await self._call("recv", payload)
            return header.tobytes(), payload

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        ep, self._ep = self._ep, None  # dropping the endpoint lets UCX reset at transport close
        try:
            await ep.close()  # cancels our pending requests; the peer's fail via error handling
        except self._errors as e:
            logger.debug("ucx endpoint close: %s", e)
        if self._on_close is not None:
            self._on_close(self)

    @contextlib.contextmanager
    def _frame(self, what: str):
        """Around the messages of one frame: any failure leaves the stream out of step for good."""
        if self.closed:
            raise TransportError(f"{what} on a {'closed' if self._closed else 'broken'} connection")
        try:
            yield
        except BaseException:
            # The peer is gone, or the frame is half sent or half read (cancelled, or the
            # allocator failed); a cancelled recv even stays posted and would swallow a message.
            self._broken = True
            raise

    async def _call(self, method: str, buf: np.ndarray) -> None:
        """`ep.send(buf)` or `ep.recv(buf)`, with ucxx's errors turned into TransportError."""
        if self._closed:  # closed by another task between two messages of this frame
            raise TransportError(f"{method} on a closed connection")
        try:
            await getattr(self._ep, method)(buf)
        except self._errors as e:
            raise TransportError(f"{method} failed: {type(e).__name__}: {e}") from e


class UcxTransport(Transport):
    """UCX listener and endpoints (tcp between hosts in the listener/endpoint model)."""

    name = "ucx"

    def __init__(self) -> None:
        self._ucxx = import_ucxx()
        self._started = False
        self._listener = None
        self._closing = False
        self._conns: set[UcxConnection] = set()
        self._handlers: set[asyncio.Task] = set()

    async def listen(self, handler: Handler, host: str, port: int = 0) -> str:
        if self._listener is not None:
            raise TransportError("already listening")
        self._start()
        try:
            self._listener = self._ucxx.create_listener(functools.partial(self._serve, handler), port=port)
        except self._ucxx.exceptions.UCXError as e:
            raise TransportError(f"cannot listen on port {port}: {e}") from e
        address = f"{host}:{self._listener.port}"
        logger.info("ucx transport listening on %s (bound to 0.0.0.0)", address)
        return address

    async def connect(self, address: str, timeout: float = 5.0) -> Connection:
        host, port = split_address(address)
        self._start()
        # A port with no listener is not refused: UCX waits for its peer-info exchange to
        # time out, so bound both that and the whole attempt by `timeout`.
        create = self._ucxx.create_endpoint(host, port, connect_timeout=timeout)
        try:
            ep = await asyncio.wait_for(create, timeout)
        except (self._ucxx.exceptions.UCXError, asyncio.TimeoutError, OSError) as e:
            error = f"cannot connect to {address}: {e!r}"
        else:
            return self._track(ep)
        # Raised out here, unchained: the traceback of the failed attempt holds ucxx frames that
        # would pin the UCX context for as long as the caller keeps the exception.
        raise TransportError(error)

    async def close(self) -> None:
        self._closing = True
        for conn in list(self._conns):
            await conn.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await asyncio.sleep(0)  # ucxx retires its handler bookkeeping one loop turn later
        # Closed last: ucxx warns when a listener goes while its handlers still run.
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._started:
            self._started = False
            _Runtime.release(self._ucxx)

    async def _serve(self, handler: Handler, ep) -> None:
        """Run `handler` on an accepted endpoint; ucxx runs this as a task of its own."""
        task = asyncio.current_task()
        self._handlers.add(task)  # so that close() can cancel it
        conn = self._track(ep)
        try:
            if not self._closing:
                await handler(conn)
        except TransportError as e:
            logger.info("ucx connection handler ended: %s", e)
        except Exception:
            logger.exception("ucx connection handler failed")
        finally:
            await conn.close()
            self._handlers.discard(task)

    def _start(self) -> None:
        if not self._started:
            _Runtime.acquire(self._ucxx)
            self._started = True

    def _track(self, ep) -> UcxConnection:
        conn = UcxConnection(ep, self._ucxx, on_close=self._conns.discard)
        self._conns.add(conn)
        return conn
