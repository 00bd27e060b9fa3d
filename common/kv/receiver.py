"""The receiving end of KV streams (token service from prompt services, cache store from token
services): one task per incoming connection reads messages and answers each on the same link:
- "kv": `store(header, payload)`, then an ack;
- "fetch" (cache store): `fetch(header)` -> (the tokens asked for, their wire dtype name), sent
  back as one "kv" message of that dtype;
- anything else, a refusal, or a frame that breaks the format: an error frame that names the
  problem (the link stays up for the other requests on it). A malformed frame is answered only
  when its header's request id, epoch and ranges are valid (what the sender matches answers by,
  wire.WireError.answer_to); else it is logged and skipped."""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections.abc import Awaitable, Callable

import numpy as np

from common.kv.transport import Connection, Handler, TransportError
from common.kv.wire import Header, WireError, send_ack, send_error, stream_in, stream_out

log = logging.getLogger(__name__)
ERROR_CHARS = 500  # of an error frame's message: a malformed header's own text is quoted in it


def kv_server(store: Callable[[Header, np.ndarray], Awaitable[None] | None], refused: tuple[type[Exception], ...],
              request_id_var: contextvars.ContextVar[str] | None = None,
              fetch: Callable[[Header], tuple[np.ndarray, str]] | None = None,
              max_payload: int | None = None) -> Handler:
    """A transport handler: `store(header, payload)` (awaited if it is a coroutine) each "kv" message (payload as stream_in
    gives it) and `fetch(header)` -> (payload, dtype name) each "fetch" message; an exception in
    `refused` is answered as an error frame. A frame over `max_payload` bytes closes its link
    unread (the receiver's largest legitimate message: nothing bigger is ever allocated)."""

    async def answer(conn: Connection, header: Header, payload: np.ndarray) -> None:
        if header.kind == "kv":
            stored = store(header, payload)
            if inspect.isawaitable(stored):
                await stored
            await send_ack(conn, header)
        elif header.kind == "fetch" and fetch is not None:
            kv, dtype = fetch(header)  # kv: (layers, 2, tokens, kv_heads, head_dim) of `dtype`
            await stream_out(conn, kv, request_id=header.request_id, epoch=header.epoch,
                             layer_start=header.layer_start, layer_end=header.layer_start + kv.shape[0], token_start=0, token_end=kv.shape[2], dtype=dtype)
        else:
            log.warning("unexpected %r message for %s", header.kind, header.request_id)
            await send_error(conn, header, f"this receiver takes no {header.kind!r} messages")

    async def handle(conn: Connection) -> None:
        while True:
            try:
                header, payload = await stream_in(conn, max_payload=max_payload)
            except TransportError as exc:
                if not conn.closed:
                    log.warning("KV link dropped: %s", exc)
                    await conn.close()
                return  # the sender went away (or broke the framing); its requests are cleaned up by abort/expiry
            except Exception as exc:  # noqa: BLE001 - the frame was read whole: the link is still in step
                log.warning("malformed KV message: %s: %s", type(exc).__name__, exc)
                answer_to = exc.answer_to if isinstance(exc, WireError) else None
                if answer_to is not None and not await reply_error(conn, answer_to, f"malformed KV message: {exc}"):
                    return
                continue
            named = request_id_var.set(header.request_id) if request_id_var is not None else None
            try:
                await answer(conn, header, payload)
            except TransportError:
                return
            except Exception as exc:  # noqa: BLE001 - one bad message (or a disk error) must not cut the link
                if isinstance(exc, refused):
                    log.warning("refused KV %s: %s", header.kind, exc)
                else:
                    log.exception("KV %s failed", header.kind)
                if not await reply_error(conn, header, str(exc) if isinstance(exc, refused)
                                         else f"{type(exc).__name__}: {exc}"):
                    return
            finally:  # the link's next lines ("KV link dropped") are not this frame's request's
                if named is not None:
                    request_id_var.reset(named)

    return handle


async def reply_error(conn: Connection, header: Header, message: str) -> bool:
    """Answer `header` with an error frame; False if the link broke meanwhile."""
    try:
        await send_error(conn, header, message[:ERROR_CHARS])
    except TransportError:
        return False
    return True
