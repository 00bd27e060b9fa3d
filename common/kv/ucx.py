"""KV transport over UCX, through `ucxx` (the maintained successor of ucx-py).

Connections are set up over a TCP rendezvous, not ucxx's listener: that one takes no address and
binds 0.0.0.0, while a service must listen only where it was told (issue #10). The listening side
accepts TCP connections on its configured host and port; the connecting side speaks first, and
each side sends the other one message,

    RENDEZVOUS: 8 bytes magic | uint64 tag | uint32 n | uint32 t (little endian),
                then n bytes: its UCX worker address, then t bytes: the cluster token (connecting side)

where `tag` is the random 64-bit tag it will receive this connection's messages on. The listening
side checks the token before UCX sees the address (with a cluster token, a stranger's bytes never
reach UCX's address parser) and answers REFUSED when it is wrong; common/kv/auth.py's handshake then runs on top, as on
TCP. Each side then
creates an endpoint to the other's worker, sends with the other's tag and receives on its own. The
TCP socket stays open as long as the connection: its end (the peer closed or died) closes the UCX
side, failing a pending recv at once; UCX's endpoint error handling does the same when UCX itself
sees the peer fail. UCX's own transports (tcp, shared memory, RDMA) carry the messages.

Before the connection is used each side sends MAGIC once as a tagged message and receives the
other's, so that UCX's wireup is done. A frame is one or two tagged messages, received in order:

    1. head: 16 bytes, uint64 header_len | uint64 payload_len (little endian), the header (at most
       MAX_HEADER_LEN), and the payload too when all of it fits in HEAD_BYTES (64 KiB); received
       into the connection's HEAD_BYTES buffer. A longer message fails the recv and ends the link
    2. payload: payload_len bytes, received straight into the allocator's array; only when it did
       not fit in the head

Each UCX request that does not complete at once costs a wake of the receiving loop, so a frame is
as few of them as it can be: a small frame (an acknowledgement, a header, an activation) is one.

Lifecycle, per process:
1. `UcxTransport(token)` sets the UCX environment and imports ucxx. Never at module import: UCX
   initialised before a fork breaks the child, and ucxx reads the environment at import.
2. The first `listen`/`connect` initialises UCX inside the running event loop, which progresses
   the worker from then on (LoopProgress).
3. `close()` closes every endpoint and the listener; the last open transport in the process
   takes the worker off the loop and resets UCX, without which the process hangs at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hmac
import logging
import os
import secrets
import struct
from collections.abc import Callable

import numpy as np

from common.kv.transport import (
    as_bytes,
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
from common.kv.ucx_progress import LoopProgress
from common.kv.ucx_progress import install as install_loop_progress

logger = logging.getLogger(__name__)

# Measured on loopback (see NOTES.md, UCX): the defaults stage rendezvous through CUDA memory
# and run ~4x slower on CPU.
UCX_ENV = {
    "UCX_RNDV_FRAG_MEM_TYPE": "host",
    "UCX_RNDV_SCHEME": "put_zcopy",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
    # Endpoints made from worker addresses get UCX's newer protocol selection, which on loopback
    # TCP moved 16 MiB messages at 1.0 GB/s against 2.4 with the older one (bench.kv, this VM)
    "UCX_PROTO_ENABLE": "n",
}
# The worker progressed by the event loop (LoopProgress in the place of ucxx's "blocking" mode),
# which completes the requests itself: no progress thread, no Python-future notifier thread.
# Requests are posted from the loop's thread, hence no delayed submission. Passed to ucxx.init(),
# where they win over UCXPY_* in the environment: nothing else would progress the requests
# `UcxConnection` posts. UCXPY_* are left as they were (children inherit the environment).
UCXX_PROGRESS = dict(progress_mode="blocking", enable_python_future=False, enable_delayed_submission=False)


RENDEZVOUS = struct.Struct("<8sQII")  # magic, the sender's receive tag, worker address and token lengths
MAGIC, REFUSED = b"dejavuU2", b"dejavuNO"  # U2: frames as a head and a payload (U1: three messages)
HEAD_BYTES = FRAME_PREFIX.size + MAX_HEADER_LEN  # 64 KiB: a frame's first message, at most
MAX_TOKEN = 4096
MAX_WORKER_ADDRESS = 1 << 16  # a longer one is not a UCX worker address
RENDEZVOUS_TIMEOUT_S = 5.0


class _Runtime:
    """The process-wide ucxx context, shared by all UcxTransports of the process (ucxx has one)."""

    users = 0

    @classmethod
    def acquire(cls, ucxx) -> None:
        if cls.users == 0:
            ucxx.init(**UCXX_PROGRESS)  # the running loop progresses the worker from now on (LoopProgress)
        cls.users += 1

    @classmethod
    def release(cls, ucxx) -> None:
        cls.users -= 1
        if cls.users:
            return
        try:
            for progress in list(LoopProgress.running.values()):  # one: the process's transports share a loop
                try:
                    progress.stop("UCX was reset: the last UCX transport of this process closed")
                except Exception as e:
                    logger.warning("UCX's last progress before its reset failed: %r", e)
        finally:
            ctx = getattr(ucxx.core, "_ctx", None)  # private: ucxx keeps its progress objects there
            if ctx is not None:
                ctx.clear_progress_tasks()  # a failed reset must not leave ucxx a stopped one
            gc.collect()  # closed endpoints caught in reference cycles still pin the context
            try:
                ucxx.reset()
            except ucxx.exceptions.UCXError as e:
                logger.warning("UCX not reset, something still holds an endpoint: %s", e)


def import_ucxx():
    """Import ucxx after setting its environment: UCX's settings ours only where the user set none
    (ucxx's progress is set at its init: UCXX_PROGRESS)."""
    for key, value in UCX_ENV.items():
        os.environ.setdefault(key, value)
    import ucxx

    install_loop_progress()
    return ucxx


class UcxConnection(Connection):
    """One peer: a ucxx endpoint to its worker, tagged both ways, and the rendezvous socket that
    says when it is gone (see the module docstring)."""

    def __init__(self, ep, ucxx, send_tag: int, recv_tag: int, link: asyncio.StreamWriter,
                 reader: asyncio.StreamReader, on_close: Callable[[UcxConnection], None] | None = None):
        """Takes ownership of a ucxx Endpoint (to the peer's worker) and of the rendezvous socket
        (`link`, `reader`), whose end closes the connection; `on_close(self)` runs once closed."""
        self._ep = ep
        self._errors = ucxx.exceptions.UCXError
        self._send_tag, self._recv_tag = send_tag, recv_tag
        self._link = link
        self._on_close = on_close  # lets the transport forget this connection
        self._send_lock = asyncio.Lock()
        self._head = np.zeros(HEAD_BYTES, dtype=np.uint8)  # recv's: one reader, and it outlives a cancelled recv
        self._closing: asyncio.Future | None = None  # set by the first close()
        self._broken = False
        self._watch = asyncio.ensure_future(self._watch_link(reader))

    async def _watch_link(self, reader: asyncio.StreamReader) -> None:
        """Wait for the rendezvous socket to end (nothing is sent on it after the rendezvous):
        the peer closed the connection or died. Close ours then, failing a pending recv."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await reader.read(1)
        await self.close()

    @property
    def _closed(self) -> bool:
        return self._closing is not None

    @property
    def closed(self) -> bool:
        return self._closed or self._broken

    async def send(self, header: bytes, payload: np.ndarray | memoryview | bytes | None = None) -> None:
        body = as_bytes(payload)
        check_header(header)
        start = FRAME_PREFIX.size + len(header)  # where the payload begins in the head
        inline = start + body.nbytes <= HEAD_BYTES
        head = np.empty(start + body.nbytes if inline else start, dtype=np.uint8)
        FRAME_PREFIX.pack_into(head, 0, len(header), body.nbytes)
        head[FRAME_PREFIX.size:start] = np.frombuffer(header, dtype=np.uint8)
        if inline:
            head[start:] = body  # a copy of at most HEAD_BYTES: one UCX request instead of two
        async with self._send_lock:
            with self._frame("send"):
                await self._call("send", head)
                if not inline:
                    await self._call("send", body)

    async def recv(self, alloc: Allocator | None = None) -> tuple[bytes, np.ndarray]:
        with self._frame("recv"):
            # ucxx 0.52 accepts a message shorter than the buffer and does not say how long it was
            # (rapidsai/ucxx#104), so the head buffer is zero past what the last frame used: a short
            # head from a broken peer parses as zeros, never as the previous frame's bytes
            head = self._head
            await self._call("recv", head)  # a longer message fails the recv: the link breaks
            header_len, payload_len = FRAME_PREFIX.unpack_from(head)
            if header_len > MAX_HEADER_LEN:
                raise TransportError(f"header of {header_len} bytes: stream is corrupt")
            start = FRAME_PREFIX.size + header_len
            header = head[FRAME_PREFIX.size:start].tobytes()
            payload = checked_buffer(alloc or default_alloc, header, payload_len)
            if start + payload_len <= HEAD_BYTES:  # the sender's rule: it came in the head
                payload[:] = head[start:start + payload_len]
                head[:start + payload_len] = 0
            else:
                head[:start] = 0
                await self._call("recv", payload)
            return header, payload

    async def close(self) -> None:
        """Idempotent; every caller returns once the endpoint is closed (the transport resets UCX
        right after closing its connections, which must not find an endpoint still held)."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._watch.cancel()  # its own close() call, if that is what runs this, is shielded
        self._link.close()  # the peer's watch sees the end and closes its side
        ep, self._ep = self._ep, None  # dropping the endpoint lets UCX reset at transport close
        try:
            await ep.close()  # cancels our pending requests
        except self._errors as e:
            logger.debug("ucx endpoint close: %s", e)
        progress = LoopProgress.of(asyncio.get_running_loop())
        if progress is not None:
            progress.poke()  # the cancelled requests complete without an event on the descriptor
        await asyncio.gather(self._watch, return_exceptions=True)
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
        """`ep.send(buf)` or `ep.recv(buf)` with this connection's tags, ucxx's errors turned
        into TransportError."""
        if self._closed:  # closed by another task between two messages of this frame
            raise TransportError(f"{method} on a closed connection")
        tag = self._send_tag if method == "send" else self._recv_tag
        progress = LoopProgress.of(asyncio.get_running_loop())
        if progress is None:
            raise TransportError(f"{method} on a loop that does not progress UCX (another event loop?)")
        try:
            await progress.call(self._ep, method, buf, tag)
        except self._errors as e:
            raise TransportError(f"{method} failed: {type(e).__name__}: {e}") from e


class UcxTransport(Transport):
    """UCX endpoints between workers, set up over a TCP rendezvous on the configured address."""

    name = "ucx"

    def __init__(self, token: str = "") -> None:
        """`token`: the cluster token, sent in the rendezvous and required of connecting peers."""
        self._token = token.encode()
        self._ucxx = import_ucxx()
        self._started = False
        self._server: asyncio.base_events.Server | None = None
        self._closing = False
        self._conns: set[UcxConnection] = set()
        self._handlers: set[asyncio.Task] = set()

    async def listen(self, handler: Handler, host: str, port: int = 0) -> str:
        if self._server is not None:
            raise TransportError("already listening")
        self._start()
        try:
            sock = listening_socket(host, port)
        except OSError as e:
            raise TransportError(f"cannot listen on {host}:{port}: {e}") from e
        self._server = await asyncio.start_server(functools.partial(self._accept, handler), sock=sock)
        address = f"{host}:{sock.getsockname()[1]}"
        logger.info("ucx transport listening on %s", address)
        return address

    async def connect(self, address: str, timeout: float = 5.0) -> Connection:
        host, port = split_address(address)
        self._start()
        deadline = asyncio.get_running_loop().time() + timeout  # one bound for the whole attempt
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise TransportError(f"cannot connect to {address}: {e!r}") from e
        try:
            left = max(deadline - asyncio.get_running_loop().time(), 0.0)
            return await asyncio.wait_for(self._rendezvous(reader, writer, accepting=False), left)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, TransportError,
                self._ucxx.exceptions.UCXError) as e:
            writer.close()
            error = f"cannot connect to {address}: {e!r}"
        except BaseException:  # cancelled: no half-open link left behind
            writer.close()
            raise
        # Raised out here, unchained: the traceback of a failed attempt may hold ucxx frames that
        # would pin the UCX context for as long as the caller keeps the exception.
        raise TransportError(error)

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            await conn.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await asyncio.sleep(0)  # ucxx retires its request bookkeeping one loop turn later
        self._server = None
        if self._started:
            self._started = False
            _Runtime.release(self._ucxx)

    async def _rendezvous(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          accepting: bool) -> UcxConnection:
        """Exchange (receive tag, worker address) with the peer, the connecting side first and
        with the token; then an endpoint to the peer's worker."""
        self._check_open()
        own, recv_tag = self._ucxx.get_worker_address().tobytes(), secrets.randbits(64)
        token = b"" if accepting else self._token
        hello = RENDEZVOUS.pack(MAGIC, recv_tag, len(own), len(token)) + own + token
        if not accepting:
            writer.write(hello)
            await writer.drain()
        magic, send_tag, n, t = RENDEZVOUS.unpack(await reader.readexactly(RENDEZVOUS.size))
        if magic == REFUSED and not accepting:
            raise TransportError("the KV peer refused this service's cluster token (every service of a cluster "
                                 "needs the same DEJAVU_CLUSTER_TOKEN)")
        if magic != MAGIC or not 0 < n <= MAX_WORKER_ADDRESS or t > MAX_TOKEN:
            raise TransportError("the peer is not a UCX KV transport (bad rendezvous)")
        address = await reader.readexactly(n)
        given = await reader.readexactly(t)
        if accepting:
            if self._token and not hmac.compare_digest(self._token, given):
                writer.write(RENDEZVOUS.pack(REFUSED, 0, 0, 0))
                await writer.drain()
                raise TransportError("wrong or missing cluster token (DEJAVU_CLUSTER_TOKEN)")
            writer.write(hello)
            await writer.drain()
        self._check_open()
        address = self._ucxx.get_ucx_address_from_buffer(address)
        try:
            ep = await self._ucxx.create_endpoint_from_worker_address(address, endpoint_error_handling=True)
        except self._ucxx.exceptions.UCXError as e:
            raise TransportError(f"no UCX endpoint to the peer's worker: {e}") from None
        if self._closing:  # closed while the endpoint was made: close() did not see it
            await ep.close()
            raise TransportError("the UCX transport was closed")
        conn = UcxConnection(ep, self._ucxx, send_tag, recv_tag, writer, reader, on_close=self._conns.discard)
        self._conns.add(conn)
        try:  # one message each way: UCX's wireup is done before the connection is used (a send
            #   queued behind it would otherwise wait for a peer that may be stopped by then)
            ready = np.empty(len(MAGIC), dtype=np.uint8)
            results = await asyncio.gather(conn._call("send", np.frombuffer(MAGIC, dtype=np.uint8)),
                                           conn._call("recv", ready), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            if ready.tobytes() != MAGIC:
                raise TransportError("the peer's first UCX message is not the rendezvous's")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _accept(self, handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One incoming connection: the rendezvous, then `handler` (asyncio runs this as a task)."""
        task = asyncio.current_task()
        self._handlers.add(task)  # so that close() can cancel it
        try:
            if self._closing:
                writer.close()
                return
            try:
                conn = await asyncio.wait_for(self._rendezvous(reader, writer, accepting=True), RENDEZVOUS_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, TransportError,
                    self._ucxx.exceptions.UCXError) as e:
                logger.warning("ucx connection dropped during its rendezvous: %r", e)
                writer.close()
                return
            except BaseException:  # cancelled (the transport closes): no socket left open
                writer.close()
                raise
            await serve(handler, conn, "ucx")
        except asyncio.CancelledError:  # the transport closing (close() cancels us): end here. Re-raised, it
            pass  # makes Python 3.11's start_server callback ask a cancelled task for its exception: a traceback
        finally:
            self._handlers.discard(task)

    def _check_open(self) -> None:
        """Before a ucxx call that follows an await: a close() meanwhile may have reset UCX, and the
        call would then make ucxx a new context of its own, in its default mode (a progress thread)."""
        if self._closing or not self._started:
            raise TransportError("the UCX transport was closed")

    def _start(self) -> None:
        if not self._started:
            _Runtime.acquire(self._ucxx)
            self._started = True
