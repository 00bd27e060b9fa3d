"""Reading a replica back from a cache store (recovery): one "fetch" message on a fresh
connection, one "kv" message in answer, then the connection is closed. A fetch is rare (once per
recovered request), so it does not share the replication links and their ack readers."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from common.kv.transport import Transport
from common.kv.wire import as_tensor, send_fetch, stream_in
from common.protocol import FETCH_TIMEOUT_S

if TYPE_CHECKING:
    import torch


ACK_TIMEOUT_S = 30.0  # a cache store's acknowledgement of a replica message (token_service/replicator.py, stage.py)


STORE_CHECK_S = 1.0  # a replica's fetch silent this long: is its store still renewing its lease?


class FetchError(Exception):
    """The store refused the fetch (no replica, a newer epoch, too few tokens) or answered amiss."""


class StoreGone(FetchError):
    """The replica's store stopped renewing its lease and does not answer /health (hung or dead)."""


async def while_store_leased(fetch: asyncio.Future, registry, store_id: str, store_url: str) -> None:
    """Wait for `fetch`, unless the replica's store stops renewing its lease first and does not
    answer /health: a store SIGSTOPped keeps its sockets open, and its fetch would wait out
    FETCH_TIMEOUT_S, 30 s of a client's pause. Then StoreGone (the caller drops the fetch; the
    gateway prefills the request again, after about a lease TTL). A lease gone from a Redis that
    restarted empty is not death (the store answers /health, and registers again within a
    renewal); Redis unreachable says nothing of the store either: the fetch's own timeout is all
    there is then. `registry`: a common.metadata.Registry of this cluster."""
    from common.errors import Unavailable
    from common.protocol import ServiceKind
    from common.service import answers_health

    while not (await asyncio.wait({fetch}, timeout=STORE_CHECK_S))[0]:
        try:
            listed = {s.id for s in await registry.services(ServiceKind.CACHE_STORE)}
        except Unavailable:
            continue
        if store_id in listed or fetch.done() or await answers_health(store_url, STORE_CHECK_S) or fetch.done():
            continue  # (done while /health was asked: its KV is good, or its error is the one to say)
        raise StoreGone(f"the store {store_id} stopped renewing its lease and does not answer /health (hung or dead)")


async def fetch_while_leased(fetch, registry, store_id: str, store_url: str):
    """`fetch` (a coroutine of fetch_replica), dropped with StoreGone once its store is gone (see
    while_store_leased); without a registry (tests), the fetch alone. TokenEngine.restore runs it
    under a shield, so a restore cancelled meanwhile keeps the request's blocks until it ends: at
    most until the store is gone, or the fetch's own timeout for a store that is slow but alive."""
    task = asyncio.ensure_future(fetch)
    try:
        if registry is not None and store_id:
            await while_store_leased(task, registry, store_id, store_url)
        return await task
    finally:  # dropped (the store gone, or our caller cancelled): its end read, so asyncio logs nothing of it
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


async def fetch_replica(transport: Transport, address: str, request_id: str, epoch: int, tokens: int,
                        timeout: float = FETCH_TIMEOUT_S, layers: range | None = None) -> torch.Tensor:
    """Tokens [0, tokens) of the request's replica on the store at `address`, of `layers` (every
    one by default): a CPU tensor of the dtype it was replicated in (e.g. bfloat16), (layers, 2,
    tokens, kv_heads, head_dim), in the received buffer (no copy). Fetching under a newer epoch
    fences the old owner on the store. Raises FetchError, TransportError, WireError, or
    TimeoutError past `timeout` s."""
    return await asyncio.wait_for(_fetch(transport, address, request_id, epoch, tokens, timeout, layers), timeout)


async def _fetch(transport: Transport, address: str, request_id: str, epoch: int, tokens: int,
                 timeout: float, layers: range | None) -> torch.Tensor:
    conn = await transport.connect(address, timeout=timeout)
    try:
        await send_fetch(conn, request_id, epoch, tokens, layers)
        header, kv = await stream_in(conn)
    finally:
        await conn.close()
    if header.kind == "error":
        raise FetchError(f"store {address} refused {tokens} tokens of {request_id}: {header.message}")
    if header.kind != "kv" or header.request_id != request_id or (header.token_start, header.token_end) != (0, tokens):
        raise FetchError(f"store {address} answered a fetch of {request_id} with {header.kind} "
                         f"{header.request_id} tokens [{header.token_start}, {header.token_end})")
    if kv.ndim != 5 or kv.shape[2] != tokens or (layers and kv.shape[0] != len(layers)):  # e.g. kv_heads before tokens
        raise FetchError(f"store {address} answered a fetch of {tokens} tokens of {request_id} with "
                         f"{kv.shape}, not ({len(layers) if layers else 'layers'}, 2, {tokens}, kv_heads, head_dim)")
    return as_tensor(header, kv)
