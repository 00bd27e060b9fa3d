"""The two ends that bench.kv measures between: the receiver process (`python -m bench.kv --serve
NAME`: receives frames into one preallocated buffer, as a token service receives KV, and acks
each), and ucx-shm, a UCX connection over shared memory that only this benchmark makes (ucxx
endpoints from worker addresses swapped out of band, error handling off: the services' listener
endpoints use tcp only)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import socket
import sys

import numpy as np

from common.kv import make_transport
from common.kv.shm import DEFAULT_RING_BYTES

# make_transport's arguments (name, ring bytes, cma): "+cma" as the services run on one host (payloads
# of 8 MiB or more read from the sender's memory while its reader reads, smaller ones of 64 KiB or
# more through a shared-memory ring; common/kv/shm.py), "+ring" rings only, the others neither
TRANSPORT_OF = {"ucx+cma": ("ucx", DEFAULT_RING_BYTES, True), "ucx+ring": ("ucx", DEFAULT_RING_BYTES, False),
                "ucx-tcp": ("ucx", 0, False), "tcp+cma": ("tcp", DEFAULT_RING_BYTES, True),
                "tcp+ring": ("tcp", DEFAULT_RING_BYTES, False), "tcp": ("tcp", 0, False)}


def transport_of(name: str):
    base, ring_bytes, cma = TRANSPORT_OF[name]
    return make_transport(base, ring_bytes=ring_bytes, cma=cma)
SHM_TLS = "sm,self"  # the ucx-shm receiver's UCX_TLS (sysv eager, cma rendezvous); --ucx-env UCX_TLS wins
SHM_TAG = 0x6B765F73686D  # worker-address endpoints agree no tags: both directions use this one


# --- the receiver process ------------------------------------------------------------------------

async def receive(conn, buf: np.ndarray) -> None:
    """Receive frames into `buf`, as a token service receives KV into its pool; ack each one."""
    while True:
        await conn.recv(lambda header, nbytes: buf[:nbytes])
        await conn.send(b"ack")


async def serve(name: str, nbytes: int) -> None:
    """Receiver of one transport: print an address, receive until SIGTERM, SIGINT or EOF on stdin."""
    buf = np.ones(nbytes, dtype=np.uint8)  # touched now: no page faults inside a timed message
    async with contextlib.AsyncExitStack() as stack:
        if name == "ucx-shm":
            conn = await open_shm(stack, print_then_read)
            # No local name for the task: its frames would pin the UCX context at reset.
            stack.push_async_callback(cancel, asyncio.create_task(receive(conn, buf)))
        else:
            transport = transport_of(name)
            stack.push_async_callback(transport.close)
            print(await transport.listen(functools.partial(receive, buf=buf), "127.0.0.1"), flush=True)
        stop, loop = asyncio.Event(), asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_reader(sys.stdin.fileno(), stop.set)  # readable only at EOF: the benchmark is gone
        await stop.wait()


async def print_then_read(own: str) -> str:
    print(own, flush=True)
    return (await asyncio.to_thread(sys.stdin.readline)).strip()


async def cancel(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# --- ucx-shm: endpoints from worker addresses ------------------------------------------------------

async def open_shm(stack: contextlib.AsyncExitStack, exchange):
    """A UcxConnection to the peer whose hex worker address `await exchange(own_hex)` returns.
    Error handling off: with it on, UCX uses tcp only. The stack closes the connection, then
    releases UCX (the process's last user takes the worker off the loop and resets UCX)."""
    from common.kv.ucx import UcxConnection, _Runtime, import_ucxx

    ucxx = import_ucxx()
    _Runtime.acquire(ucxx)
    stack.callback(_Runtime.release, ucxx)
    peer = ucxx.get_ucx_address_from_buffer(bytes.fromhex(await exchange(ucxx.get_worker_address().tobytes().hex())))
    # No rendezvous socket here: one end of a socket pair stands in for its liveness link (it never
    # ends: a dead receiver shows only as a stall); each process has one shm peer, so one tag serves
    # both ways. Each piece is on the stack before the next is made: nothing leaks if one fails.
    ours, theirs = socket.socketpair()
    stack.callback(theirs.close)
    stack.callback(ours.close)
    ep = await ucxx.create_endpoint_from_worker_address(peer, endpoint_error_handling=False)
    stack.push_async_callback(ep.close)
    reader, writer = await asyncio.open_connection(sock=ours)
    conn = UcxConnection(ep, ucxx, SHM_TAG, SHM_TAG, writer, reader)
    stack.push_async_callback(conn.close)
    return conn
