"""Large KV payloads between two processes of one host through shared memory, under either transport.

On one host a KV message still crossed loopback: TCP copies it twice through the kernel, UCX's TCP
transport as well (bench.kv: 16 MiB at 2-3.6 GB/s, where a memcpy moves ~17). Here the sender of
a large payload writes it into a ring of shared memory that the receiver has mapped, and the frame
on the link says only where it lies. The payload is copied once on each side, and when messages
stream (a prefill's layers) the receiver's copy of one overlaps the sender's copy of the next.

    transport = same_host(authenticated(TcpTransport(), token), ring_bytes)   # make_transport does this

A ring, per direction of a connection, made when first needed and never required:
1. The second time a connection sends a payload of `min_bytes` (MIN_BYTES) or more (a link that
   carries one, as a replica's fetch does, never pays for a ring), the sender creates a file in
   /dev/shm (O_EXCL, mode 0600, owner only; its pages reserved with posix_fallocate off the event
   loop, so a full /dev/shm is an error now, never a SIGBUS later), writes a random cookie into it
   and sends an *offer*: the file's name, the cookie and the ring's size. That payload goes over
   the link as before.
2. The receiver, inside its recv, opens the file by name (one of ours, owned by its user, of the
   offered size), checks the cookie, maps it, unlinks it and answers yes, from a task of its own (its
   reader must not wait behind a large send of its own side, which may itself wait for the peer's
   reader). A peer on another host or in another container does not find the file; one with rings
   off (`--kv-shm-mib 0`) does not look: either answers no, and the link goes on as it was.
3. The sender reads the answer inside its own recv (the transport contract's always-reading task)
   and unlinks the file if it is still there. After a yes, its large payloads go through the ring.

Frames on the link are the inner transport's. A header that starts with a zero byte is this layer's:

    \\0F + header             an application frame whose own header starts with a zero byte (escaped)
    \\0O cookie, size, name   an offer; \\0A yes/no, its answer (no payload; handled inside recv)
    \\0S start, n + header    an application frame whose n-byte payload is at ring position `start`

Every other frame is the application's, untouched: small frames cost nothing more than before. (An
application header that starts with a zero byte may be MAX_HEADER_LEN - 2 bytes long at most. Both
ends must run this layer: the services of a cluster run one version.)

The ring is a 4 KiB control page (the receiver's consumed position, `tail`, at offset 0, written by the
receiver only; the cookie at 64), then the data. The sender takes room in frame order, under its send
lock: positions only grow, a payload never wraps (it starts over at the ring's beginning), and it
fits when the bytes from `tail` to its end are no more than the ring. When it does not fit (the
receiver is that far behind) or the payload is larger than the ring, the frame goes inline: the
ring never makes a sender wait. The sender copies the payload in and then sends the frame, so the
receiver has every byte when the frame arrives (the link's system calls order the two); it copies
them into the allocator's array and moves `tail`. That last store must not overtake its loads:
x86-64 guarantees it (a store is never reordered before an earlier load); other machines keep the
inline path (SUPPORTED).

Liveness is the link's: every frame, through the ring or not, travels on it, so a peer's death ends
the connection exactly as before, and a ring is only memory. Each file is unlinked as soon as the
receiver maps it, or by the sender at its answer or at close; one left by a process that died in
between is removed by the next ring's sweep.

Before a ring, a link tries the one-copy path (`cma`, on unless --kv-cma false) for payloads of
CMA_MIN_BYTES or more: the receiver reads the payload straight out of the sender's memory with
process_vm_readv(2) into the allocator's array, one copy by the kernel where the ring takes two. The sender's `send` returns once the
receiver says it has read (the payload must not change before), so a large send waits a round trip,
and the receipt is read by the sender's own reader. So only a connection whose owner promised a
reader that never stops (`keep_reading()`, as common/kv/peers.py's links to token services and
cache stores do) offers its memory, and a payload goes this way only while that reader waits in
recv; other connections, and a handler's answer sent between two of its reads, use the ring.

    \\0C                        an offer; the receiver answers \\0H + a random 16-byte challenge
                               (or \\0B no)
    \\0P pid, address           the sender's proof: it wrote the challenge at `address` in its
                               own memory, process `pid`; the receiver reads 16 bytes there and
                               answers \\0B yes if they are the challenge, else no (a process of
                               another PID namespace, or one the kernel does not let it read,
                               fails; the sender then offers a ring). Only a process that can put
                               the challenge into process `pid` passes, so a peer cannot point the
                               receiver at someone else's process; one try a link
    \\0R seq, address, n + header  an application frame whose n-byte payload is at `address` in the
                               sender; \\0D seq, from the receiver once it has read it

The kernel allows the read to a process of the same user that may ptrace the sender: everywhere
with Yama's ptrace_scope 0 (or no Yama), never across containers with PID namespaces of their own.
A payload the sender may no longer hold (its send was cancelled) stays referenced until the link
closes, so the receiver never reads freed memory; a failed read ends the link.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import hmac
import logging
import mmap
import os
import platform
import re
import secrets
import stat
import struct
import sys
import time
import weakref
from typing import NoReturn

import numpy as np
from prometheus_client import Counter

from common.kv.transport import (
    as_bytes,
    MAX_HEADER_LEN,
    Allocator,
    Connection,
    Handler,
    Transport,
    TransportError,
    check_header,
    checked_buffer,
    default_alloc,
)

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
NAME = re.compile(r"dejavu-kv-([0-9]{1,10})-[0-9a-f]{16}\Z")
SWEEP_AGE_S = 60.0  # a ring file older than this whose creator is gone was never answered
SUPPORTED = platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir(SHM_DIR)
DEFAULT_RING_BYTES = 32 << 20  # per direction that sends large payloads; a larger payload goes inline
MAX_RING_BYTES = 1 << 30  # a larger offer is refused
MIN_BYTES = 64 << 10  # smaller payloads ride inline: one message costs less than a copy on each side
# smaller payloads go through the ring even where the peer reads our memory: its receipt costs a
# round trip, more than the ring's second copy saves below several MiB (bench.kv on this project's
# 2-core VM, UCX, message by message: ring 1.24-1.28 GB/s against 0.96-1.17 at 1 MiB, 2.86 against
# 2.41 at 4 MiB, 3.97-4.64 against 4.97-5.55 at 16 MiB)
CMA_MIN_BYTES = 8 << 20
CONTROL = 4096  # the control page: tail (uint64) at 0, the cookie at COOKIE_AT
COOKIE_AT, COOKIE_LEN = 64, 16

OURS, ESCAPED, OFFER, ANSWER, SLOT = b"\0", b"\0F", b"\0O", b"\0A", b"\0S"
CMA_OFFER, CHALLENGE, PROOF, CMA_ANSWER, READ, DONE = b"\0C", b"\0H", b"\0P", b"\0B", b"\0R", b"\0D"
OFFER_FMT = struct.Struct("<16sQ")  # cookie, the ring's data bytes; the file's name follows
SLOT_FMT = struct.Struct("<QQ")  # the payload's start position in the ring, its bytes
PROOF_FMT = struct.Struct("<QQ")  # the sender's pid, the address where it wrote the challenge
READ_FMT = struct.Struct("<QQQ")  # the read's number, the payload's address in the sender, its bytes
DONE_FMT = struct.Struct("<Q")  # the read's number
YES, NO = b"\1", b"\0"
RING_SENT = Counter("dejavu_kv_ring_sent_bytes_total", "KV payload bytes sent through a shared-memory ring")
RING_RECEIVED = Counter("dejavu_kv_ring_received_bytes_total", "KV payload bytes received through a shared-memory ring")
CMA_SENT = Counter("dejavu_kv_cma_sent_bytes_total", "KV payload bytes the receiver read straight from this process")
CMA_RECEIVED = Counter("dejavu_kv_cma_received_bytes_total", "KV payload bytes read straight from the sender's memory")


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _process_vm_readv():
    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).process_vm_readv  # a foreign call: the GIL is released
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_ssize_t
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                   ctypes.c_ulong]
    return fn


_VM_READV = _process_vm_readv()
CMA_SUPPORTED = _VM_READV is not None


def vm_read(pid: int, address: int, into: np.ndarray) -> None:
    """Copy into.nbytes bytes at `address` in process `pid` into `into` (contiguous): one copy, by
    the kernel. Raises OSError (ESRCH: no such process; EPERM: not allowed; EFAULT: not mapped)."""
    n, base, done = into.nbytes, into.ctypes.data, 0
    while done < n:  # a read stops short where the remote range stops being readable
        local, remote = _IoVec(base + done, n - done), _IoVec(address + done, n - done)
        got = _VM_READV(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        if got == 0:
            raise OSError(errno.EFAULT, f"no byte readable at {address + done:#x} in process {pid}")
        done += got


def same_host(transport: Transport, ring_bytes: int = DEFAULT_RING_BYTES, min_bytes: int = MIN_BYTES,
              cma: bool = True, cma_min_bytes: int = CMA_MIN_BYTES) -> Transport:
    """`transport` whose connections move payloads of `min_bytes` or more, when both ends are on one
    host, through a shared-memory ring, or those of `cma_min_bytes` or more straight from the
    sender's memory (`cma`); `ring_bytes` 0 and `cma` False: never offer nor accept either (the
    frames still carry this layer)."""
    return SameHostTransport(transport, ring_bytes if SUPPORTED else 0, max(min_bytes, 1), cma and CMA_SUPPORTED,
                             max(cma_min_bytes, min_bytes, 1))


class Ring:
    """One direction's ring, as one side maps it."""

    def __init__(self, mm: mmap.mmap, size: int):
        self.mm, self.size = mm, size
        self.tail = np.frombuffer(mm, dtype=np.uint64, count=1)  # the receiver's consumed position
        self.data = np.frombuffer(mm, dtype=np.uint8, count=size, offset=CONTROL)

    def close(self) -> None:
        self.tail = self.data = None  # numpy's views pin the mapping
        with contextlib.suppress(BufferError):
            self.mm.close()


def create_ring(size: int) -> tuple[Ring, str, bytes]:
    """A new ring file in SHM_DIR, its pages reserved: (ring, path, cookie). Raises OSError."""
    sweep()
    path = os.path.join(SHM_DIR, f"dejavu-kv-{os.getpid()}-{secrets.token_hex(8)}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.posix_fallocate(fd, 0, CONTROL + size)
        mm = mmap.mmap(fd, CONTROL + size)
    except BaseException:
        unlink(path)
        raise
    finally:
        os.close(fd)
    cookie = secrets.token_bytes(COOKIE_LEN)
    mm[COOKIE_AT:COOKIE_AT + COOKIE_LEN] = cookie
    return Ring(mm, size), path, cookie


def open_ring(name: str, cookie: bytes, size: int) -> Ring:
    """Map the peer's ring file `name` and unlink it. Raises OSError or ValueError (not ours, not
    the offered one)."""
    if not NAME.match(name):
        raise ValueError(f"{name!r} is not a ring's name")
    if not 0 < size <= MAX_RING_BYTES:
        raise ValueError(f"a ring of {size} bytes")
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size != CONTROL + size:
            raise ValueError(f"{path} is not the offered ring")
        mm = mmap.mmap(fd, CONTROL + size)
    finally:
        os.close(fd)
    if not hmac.compare_digest(mm[COOKIE_AT:COOKIE_AT + COOKIE_LEN], cookie):
        mm.close()
        raise ValueError(f"{path} does not hold the offered cookie")
    unlink(path)
    return Ring(mm, size)


def unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def sweep() -> None:
    """Unlink the ring files of our user's processes that are gone (they died between an offer and
    its answer). Only old ones: a process of another PID namespace sharing /dev/shm looks gone."""
    with contextlib.suppress(OSError):
        for name in os.listdir(SHM_DIR):
            match = NAME.match(name)
            if not match or int(match[1]) == os.getpid():
                continue
            path = os.path.join(SHM_DIR, name)
            try:
                st = os.stat(path)
                if st.st_uid != os.getuid() or time.time() - st.st_mtime < SWEEP_AGE_S:
                    continue
                os.kill(int(match[1]), 0)
            except ProcessLookupError:
                unlink(path)
            except OSError:  # gone already, or a process of another user
                continue


class SameHostConnection(Connection):
    """An inner connection, and a ring each way once both ends have mapped it (module docstring)."""

    def __init__(self, inner: Connection, ring_bytes: int, min_bytes: int = MIN_BYTES, cma: bool = False,
                 cma_min_bytes: int = CMA_MIN_BYTES):
        self.inner, self.ring_bytes, self.min_bytes, self.cma = inner, ring_bytes, min_bytes, cma
        self.cma_min_bytes = cma_min_bytes
        self._lock = asyncio.Lock()  # ring room is taken in the order frames go out
        self._cma_out = False  # the peer reads our large payloads from our memory
        self._cma_offered: np.ndarray | None = None  # offered: the challenge, once in our memory
        self._challenge: bytes | None = None  # asked of the peer, its proof not yet read
        self._challenged = False  # one challenge a link: no guessing
        self._cma_declined = not cma
        self._cma_from: int | None = None  # the peer's pid, once we read its payloads
        self._reads: dict[int, tuple[asyncio.Future, np.ndarray]] = {}  # our payloads the peer is to read
        self._next_read = 0
        self._reading = False  # a recv is waiting for the peer's next frame
        self._always_read = False  # keep_reading(): our large sends may wait for a receipt our reader takes
        self._out: Ring | None = None  # ours, once the peer has mapped it
        self._offered: tuple[Ring, str] | None = None  # made and offered, not yet answered
        self._declined = not ring_bytes  # no ring this way: off, refused, or none could be made
        self._head = 0  # where our next payload may start
        self._in: Ring | None = None  # the peer's
        self._in_tail = 0
        self._large = 0  # large payloads sent while there is no ring: the second one offers
        self._answering: set[asyncio.Task] = set()
        self._broken = False
        self.ring_frames = {"sent": 0, "received": 0}  # payloads that went through a ring
        self._control = {OFFER: self._answer, ANSWER: self._answered, CMA_OFFER: self._challenge_offer,
                         CHALLENGE: self._prove, PROOF: self._answer_cma, CMA_ANSWER: self._answered_cma,
                         DONE: self._read_done}
        self.cma_frames = {"sent": 0, "received": 0}  # payloads read from the sender's memory

    @property
    def closed(self) -> bool:
        return self._broken or self.inner.closed

    @property
    def ring_out(self) -> bool:
        """Whether large payloads go through a ring from this side."""
        return self._out is not None

    @property
    def cma_out(self) -> bool:
        """Whether the peer reads large payloads from this side's memory."""
        return self._cma_out

    def keep_reading(self) -> None:
        self._always_read = True

    def _wants_cma(self) -> bool:
        """Not yet offered our memory, and would: we read always, and it is on."""
        return self._always_read and not (self._cma_declined or self._cma_out)

    async def send(self, header: bytes, payload: np.ndarray | memoryview | bytes | None = None) -> None:
        check_header(header)
        if header[:1] == OURS and len(header) + len(ESCAPED) - 1 > MAX_HEADER_LEN:
            raise ValueError(f"a frame header of {len(header)} bytes that starts with a zero byte: "
                             f"the most is {MAX_HEADER_LEN - len(ESCAPED) + 1}")
        self._check()
        body = as_bytes(payload)
        framed = ESCAPED + header if header[:1] == OURS else header
        if body.nbytes < self.min_bytes or self._declined and self._cma_declined:
            return await self.inner.send(framed, body)
        # read from our memory only on a link whose owner reads always, while its reader waits: that
        # reader takes the receipt the send waits for
        if (self._cma_out and self._always_read and self._reading and body.nbytes >= self.cma_min_bytes
                and len(READ) + READ_FMT.size + len(header) <= MAX_HEADER_LEN):
            return await self._send_read(header, body)
        async with self._lock:
            start = self._room(body.nbytes, len(header))
            if start is None:
                undecided = self._wants_cma() or not (self._declined or self._out)
                if undecided and self._offered is None and self._cma_offered is None:
                    self._large += 1
                    if self._large >= 2:
                        await self._offer()
                return await self.inner.send(framed, body)
            ring, n = self._out, body.nbytes
            offset = start % ring.size
            np.copyto(ring.data[offset:offset + n], body)
            self._head = start + n
            await self.inner.send(SLOT + SLOT_FMT.pack(start, n) + header)
            self.ring_frames["sent"] += 1
            RING_SENT.inc(n)

    def _room(self, n: int, header_len: int) -> int | None:
        """Where an n-byte payload would start in our ring, or None: no ring, no room, or its
        header too long to carry the slot."""
        ring = self._out
        if ring is None or n > ring.size or len(SLOT) + SLOT_FMT.size + header_len > MAX_HEADER_LEN:
            return None
        start = self._head
        if start % ring.size + n > ring.size:  # never wraps: starts over at the ring's beginning
            start += ring.size - start % ring.size
        return start if start + n - int(ring.tail[0]) <= ring.size else None

    async def _send_read(self, header: bytes, body: np.ndarray) -> None:
        """The peer reads the payload from our memory; returns once it has."""
        seq, self._next_read = self._next_read, self._next_read + 1
        done = asyncio.get_running_loop().create_future()
        self._reads[seq] = (done, body)  # referenced until read or the link ends, whatever our caller does
        try:
            await self.inner.send(READ + READ_FMT.pack(seq, body.ctypes.data, body.nbytes) + header)
            await done
        except BaseException:
            self._broken = True  # cancelled or failed midway: the peer may still read it
            done.cancel()  # an exception nobody is left to retrieve, if the link fails later
            raise
        self.cma_frames["sent"] += 1
        CMA_SENT.inc(body.nbytes)

    async def _offer(self) -> None:
        if self._wants_cma():  # the one-copy path first
            self._cma_offered = np.zeros(0, dtype=np.uint8)  # the challenge goes here when it comes
            try:
                await self.inner.send(CMA_OFFER)
            except BaseException:
                self._cma_offered, self._cma_declined = None, True
                raise
            return
        if self._declined or self._out is not None:
            return
        try:
            ring, path, cookie = await asyncio.to_thread(create_ring, self.ring_bytes)  # fallocate: ms
        except Exception as e:  # noqa: BLE001 - no ring is never an error
            log.info("no shared-memory ring for a KV link (%s: %s): its large payloads go over the link",
                     type(e).__name__, e)
            self._declined = True
            return
        self._offered = (ring, path)  # before the send: the answer may be read before the send returns
        try:
            await self.inner.send(OFFER + OFFER_FMT.pack(cookie, ring.size) + os.path.basename(path).encode())
        except BaseException:  # not sent, or the link broke: no answer will come
            if self._offered is not None:
                self._offered = None
                ring.close()
                unlink(path)
            self._declined = True
            raise

    async def recv(self, alloc: Allocator | None = None) -> tuple[bytes, np.ndarray]:
        alloc = alloc or default_alloc
        try:
            while True:
                self._check()
                self._reading = True
                try:
                    header, payload = await self.inner.recv(functools.partial(_place, alloc))
                finally:
                    self._reading = False
                if header[:1] != OURS:
                    return header, payload
                kind = header[:2]
                if kind == ESCAPED:
                    return header[2:], payload
                if kind == SLOT:
                    return self._take(header, alloc)
                if kind == READ:
                    return self._read(header, alloc)
                control = self._control.get(kind)  # this layer's own frames, answered here
                if control is None:
                    self._break(f"a frame of unknown kind {kind!r}")
                control(header)
        except BaseException as e:  # the link is done (or this read half done): no read will be answered
            self._fail_reads(e)
            raise

    def _read(self, header: bytes, alloc: Allocator) -> tuple[bytes, np.ndarray]:
        """A payload in the peer's memory: read into the allocator's array, then say so."""
        if self._cma_from is None or len(header) < len(READ) + READ_FMT.size:
            self._break("a read frame on a link that reads no memory")
        seq, address, n = READ_FMT.unpack_from(header, len(READ))
        app = header[len(READ) + READ_FMT.size:]
        try:
            buf = checked_buffer(alloc, app, n)
        except BaseException:
            self._broken = True
            raise
        try:
            vm_read(self._cma_from, address, buf)
        except OSError as e:  # the peer died after sending, or named memory it does not have
            self._break(f"its payload could not be read from process {self._cma_from}: {e}")
        self._spawn(self._send_control(DONE + DONE_FMT.pack(seq)))
        self.cma_frames["received"] += 1
        CMA_RECEIVED.inc(n)
        return app, buf

    def _read_done(self, header: bytes) -> None:
        seq = DONE_FMT.unpack_from(header, len(DONE))[0] if len(header) == len(DONE) + DONE_FMT.size else -1
        entry = self._reads.pop(seq, None)
        if entry is None:
            self._break(f"the end of a read that was never asked for ({seq})")
        if not entry[0].done():
            entry[0].set_result(None)

    def _fail_reads(self, why: BaseException) -> None:
        """Every send waiting for the peer's read fails: it will not come. Their payloads stay
        referenced (the peer may be reading them still) until the link closes."""
        err = why if isinstance(why, TransportError) else TransportError(f"the KV link ended: {type(why).__name__}")
        self._broken = self._broken or bool(self._reads)
        for done, _ in self._reads.values():
            if not done.done():
                done.set_exception(err)

    def _challenge_offer(self, header: bytes) -> None:
        """The peer offers its memory: challenge it to put a secret of ours there (once a link)."""
        if not self.cma or self._challenged or self._cma_from is not None or len(header) != len(CMA_OFFER):
            self._spawn(self._send_control(CMA_ANSWER + NO))
            return
        self._challenged, self._challenge = True, secrets.token_bytes(COOKIE_LEN)
        self._spawn(self._send_control(CHALLENGE + self._challenge))

    def _prove(self, header: bytes) -> None:
        """Our offer is challenged: write the challenge into our memory and say where."""
        if self._cma_offered is None or self._cma_offered.size or len(header) != len(CHALLENGE) + COOKIE_LEN:
            self._break("a challenge to no offer of memory")
        self._cma_offered = np.frombuffer(bytearray(header[len(CHALLENGE):]), dtype=np.uint8)  # held until answered
        self._spawn(self._send_control(PROOF + PROOF_FMT.pack(os.getpid(), self._cma_offered.ctypes.data)))

    def _answer_cma(self, header: bytes) -> None:
        """The peer's proof: read our challenge in its memory if we can, and say whether we did."""
        challenge, self._challenge = self._challenge, None
        if challenge is None or len(header) != len(PROOF) + PROOF_FMT.size:
            self._break("a proof of no challenge")
        pid, address = PROOF_FMT.unpack_from(header, len(PROOF))
        probe, ok = np.zeros(COOKIE_LEN, dtype=np.uint8), False
        try:
            vm_read(pid, address, probe)
            ok = hmac.compare_digest(probe.tobytes(), challenge)
        except OSError as e:
            log.info("the KV peer's memory is not readable from here (%s): its large payloads come "
                     "through a ring or over the link", e)
        if ok:
            self._cma_from = pid
        self._spawn(self._send_control(CMA_ANSWER + (YES if ok else NO)))

    def _answered_cma(self, header: bytes) -> None:
        if self._cma_offered is None or len(header) != len(CMA_ANSWER) + 1:
            self._break("an answer to no offer of memory")
        self._cma_offered = None
        self._cma_out = header[len(CMA_ANSWER):] == YES
        self._cma_declined = not self._cma_out
        self._large = 1  # the next large payload that does not go by it offers a ring

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _send_control(self, frame: bytes) -> None:
        try:
            await self.inner.send(frame)
        except Exception as e:  # noqa: BLE001 - the link broke: its reader and senders hear it
            self._broken = True
            log.debug("a KV link's control frame was not sent: %s", e)

    def _take(self, header: bytes, alloc: Allocator) -> tuple[bytes, np.ndarray]:
        """A payload in the peer's ring: into the allocator's array, and its room back to the peer."""
        ring, app = self._in, header[len(SLOT) + SLOT_FMT.size:]
        if ring is None or len(header) < len(SLOT) + SLOT_FMT.size:
            self._break("a ring frame without a ring")
        start, n = SLOT_FMT.unpack_from(header, len(SLOT))
        offset = start % ring.size
        if not 0 < n <= ring.size - offset or start < self._in_tail:
            self._break(f"a ring frame out of place ({start}, {n} bytes)")
        try:
            buf = checked_buffer(alloc, app, n)
        except BaseException:
            self._broken = True
            raise
        np.copyto(buf, ring.data[offset:offset + n])
        self._in_tail = start + n
        ring.tail[0] = self._in_tail  # after the copy's loads (x86-64: SUPPORTED)
        self.ring_frames["received"] += 1
        RING_RECEIVED.inc(n)
        return app, buf

    def _answer(self, header: bytes) -> None:
        """The peer offers its ring: map it if we can, and say whether we did (from a task: this
        side's own large send may hold the link, waiting for the peer's reader)."""
        ok = False
        if self.ring_bytes and self._in is None and len(header) > len(OFFER) + OFFER_FMT.size:
            cookie, size = OFFER_FMT.unpack_from(header, len(OFFER))
            name = header[len(OFFER) + OFFER_FMT.size:].decode("ascii", "replace")
            try:
                self._in, ok = open_ring(name, cookie, size), True
            except (OSError, ValueError) as e:
                log.info("the KV peer's shared-memory ring is not usable here (%s): its large payloads "
                         "come over the link", e)
        self._spawn(self._send_control(ANSWER + (YES if ok else NO)))

    def _answered(self, header: bytes) -> None:
        if self._offered is None:
            self._break("an answer to no offer")
        ring, path = self._offered
        self._offered = None
        unlink(path)
        if header[len(ANSWER):] == YES:
            self._out = ring
        else:
            ring.close()
            self._declined = True

    def _break(self, why: str) -> NoReturn:
        self._broken = True
        raise TransportError(f"the KV peer broke the shared-memory protocol: {why}")

    def _check(self) -> None:
        """Once broken, always broken (the transport contract)."""
        if self._broken:
            raise TransportError("a broken connection (the KV peer broke the shared-memory protocol, or a "
                                 "frame was half read)")

    async def close(self) -> None:
        for task in list(self._answering):
            task.cancel()
        await asyncio.gather(*self._answering, return_exceptions=True)
        await self.inner.close()
        self._fail_reads(TransportError("the KV link was closed"))
        self._reads.clear()  # the peer's end is closed too: nothing reads them now
        self._cma_offered = None
        if self._offered is not None:
            self._offered[0].close()
            unlink(self._offered[1])
            self._offered = None
        for ring in (self._out, self._in):
            if ring is not None:
                ring.close()
        self._out = self._in = None


def _place(alloc: Allocator, header: bytes, nbytes: int) -> np.ndarray:
    """The inner recv's allocator: the application's for its frames, nothing for ours."""
    if header[:1] != OURS:
        return alloc(header, nbytes)
    if header[:2] == ESCAPED:
        return alloc(header[2:], nbytes)
    if nbytes:
        raise TransportError(f"a control frame with a {nbytes}-byte payload")
    return np.empty(0, dtype=np.uint8)


class SameHostTransport(Transport):
    def __init__(self, inner: Transport, ring_bytes: int, min_bytes: int = MIN_BYTES, cma: bool = False,
                 cma_min_bytes: int = CMA_MIN_BYTES):
        self.inner, self.ring_bytes, self.min_bytes, self.name = inner, ring_bytes, min_bytes, inner.name
        self.cma, self.cma_min_bytes = cma, cma_min_bytes
        self._conns: weakref.WeakSet[SameHostConnection] = weakref.WeakSet()

    async def listen(self, handler: Handler, host: str, port: int = 0) -> str:
        async def wrapped(conn: Connection) -> None:
            ours = self._wrap(conn)
            try:
                await handler(ours)
            finally:
                await ours.close()

        return await self.inner.listen(wrapped, host, port)

    async def connect(self, address: str, timeout: float = 5.0) -> Connection:
        return self._wrap(await self.inner.connect(address, timeout))

    async def close(self) -> None:
        for conn in list(self._conns):
            await conn.close()
        await self.inner.close()

    def _wrap(self, conn: Connection) -> SameHostConnection:
        ours = SameHostConnection(conn, self.ring_bytes, self.min_bytes, self.cma, self.cma_min_bytes)
        self._conns.add(ours)
        return ours
