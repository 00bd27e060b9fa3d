"""Sender-side links to KV receivers (prompt service -> token service, token service -> store).

A `PeerLink` is one connection plus a reader task that matches every acknowledgement frame the
receiver sends back to the send that asked for it, keyed by (request_id, layer_start,
token_start). `send()` returns once the frame is out; `await ack` returns once the receiver has
stored it (or raises KVRejected / TransportError). A send that cannot get its frame out within
`send_timeout` of its turn (the receiver is stopped or wedged: its socket no longer drains; time
spent waiting behind other frames on the link does not count) closes the link,
so every send on it fails at once instead of waiting forever; an acknowledgement nobody waits for
any more (its waiter timed out) is forgotten. `Peers` keeps one link per address and
reconnects after a break. For fault-injection tests, `fault_rate` makes that fraction of sends
fail with a TransportError before anything is sent (the link itself stays up).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import random

import numpy as np
import torch

from common.kv.transport import Connection, Transport, TransportError
from common.kv.wire import Header, stream_in, stream_out

log = logging.getLogger(__name__)


class KVRejected(Exception):
    """The receiver refused a KV message (unknown request, wrong shape, fenced epoch)."""


def ack_key(h: Header) -> tuple[str, int, int]:
    return (h.request_id, h.layer_start, h.token_start)


SEND_TIMEOUT_S = 30.0  # one frame out: a stalled receiver costs this, once, to every sender on its link


class PeerLink:
    def __init__(self, address: str, conn: Connection, fault_rate: float = 0.0, send_timeout: float = SEND_TIMEOUT_S):
        self.address, self.conn, self.fault_rate, self.send_timeout = address, conn, fault_rate, send_timeout
        self.waiting: dict[tuple[str, int, int], asyncio.Future] = {}
        self.sending = asyncio.Lock()  # one frame at a time: the send timeout starts when it is this frame's turn
        self.reader = asyncio.create_task(self._read_acks())
        conn.keep_reading()  # _read_acks reads until the link closes (one host: KV read from our memory)

    async def send(self, payload: torch.Tensor | np.ndarray, **fields) -> asyncio.Future:
        """Send one KV message; returns a future resolved by the receiver's acknowledgement."""
        if self.conn.closed:
            raise TransportError(f"link to {self.address} is closed")
        if self.fault_rate and random.random() < self.fault_rate:
            raise TransportError(f"injected fault (--inject-kv-faults {self.fault_rate}): send to {self.address} dropped")
        key = (fields["request_id"], fields.get("layer_start", 0), fields.get("token_start", 0))
        ack = asyncio.get_running_loop().create_future()
        self.waiting[key] = ack
        ack.add_done_callback(lambda f: self.waiting.pop(key) if self.waiting.get(key) is f else None)
        try:
            async with self.sending:
                if self.conn.closed:
                    raise TransportError(f"link to {self.address} is closed")
                await asyncio.wait_for(stream_out(self.conn, payload, **fields), self.send_timeout)
        except asyncio.TimeoutError:
            self.waiting.pop(key, None)
            ack.cancel()
            await self.close()  # a frame cut in the middle: nothing more can go over this link
            raise TransportError(f"send to {self.address} timed out after {self.send_timeout:.0f} s "
                                 "(the receiver is stopped or wedged): link closed") from None
        except BaseException:
            self.waiting.pop(key, None)
            raise
        return ack

    async def _read_acks(self) -> None:
        try:
            while True:
                header, _ = await stream_in(self.conn)
                ack = self.waiting.pop(ack_key(header), None)
                if ack is None or ack.done():
                    continue
                if header.kind == "ack":
                    ack.set_result(header)
                else:
                    ack.set_exception(KVRejected(header.message or "rejected"))
        except (TransportError, ValueError) as exc:
            self._fail_all(TransportError(f"link to {self.address} broke: {exc}"))
            if isinstance(exc, ValueError):  # a malformed frame, the link still up: nobody reads it now, so
                await self.conn.close()      # a send waiting for its receipt must fail (Peers.get reconnects)
        except asyncio.CancelledError:
            self._fail_all(TransportError(f"link to {self.address} closed"))
            raise

    def _fail_all(self, exc: Exception) -> None:
        """A sender that awaits its acknowledgement hears `exc`; one whose prefill failed before
        awaiting it (another send raised on the same broken link) no longer does, and asyncio
        would log "Future exception was never retrieved" for each: marked retrieved here."""
        for ack in self.waiting.values():
            if not ack.done():
                ack.set_exception(exc)
                ack.exception()
        self.waiting.clear()

    async def close(self) -> None:
        self.reader.cancel()
        await self.conn.close()


class Peers:
    def __init__(self, transport: Transport, connect_timeout: float = 5.0, fault_rate: float = 0.0,
                 send_timeout: float = SEND_TIMEOUT_S):
        self.transport, self.connect_timeout, self.fault_rate = transport, connect_timeout, fault_rate
        self.send_timeout = send_timeout
        self.links: dict[str, PeerLink] = {}
        self.locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)  # one peer slow to connect stalls only its own sends
        self._closing: set[asyncio.Task] = set()  # pruned links being closed

    async def get(self, address: str) -> PeerLink:
        self._prune(address)
        async with self.locks[address]:
            link = self.links.get(address)
            if link is None or link.conn.closed or link.reader.done():
                if link is not None:
                    await link.close()
                # in a context of its own: the link, its reader and the transport's tasks for it
                # outlive the request that opened it, and their log lines are no one request's
                opening = asyncio.get_running_loop().create_task(self._open(address), context=contextvars.Context())
                link = await opening
            return link

    async def _open(self, address: str) -> PeerLink:
        """A new link to `address`, kept here as soon as it exists: a caller cancelled just as it
        opened leaves it to the next caller (or to close), not open and unreferenced."""
        conn = await self.transport.connect(address, timeout=self.connect_timeout)
        link = self.links[address] = PeerLink(address, conn, self.fault_rate, self.send_timeout)
        return link

    def _prune(self, keep: str) -> None:
        """Forget broken links to other peers (stores and token services come and go; their
        addresses must not pile up here). A link in use is never broken-and-idle at once."""
        for address, link in list(self.links.items()):
            if address != keep and (link.conn.closed or link.reader.done()) and not self.locks[address].locked():
                del self.links[address], self.locks[address]
                closing = asyncio.ensure_future(link.close())  # its socket, and a shared-memory ring it holds
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for link in self.links.values():
            await link.close()
        self.links.clear()
