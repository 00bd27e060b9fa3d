"""The receiving end of KV streams (token service from prompt services, cache store from token
services): one task per incoming connection reads "kv" messages, stores each, and answers each
with an ack, or with an error frame that names the problem (the link stays up for the other
requests on it)."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable

import numpy as np

from common.kv.transport import Connection, Handler, TransportError
from common.kv.wire import Header, WireError, send_ack, send_error, stream_in

log = logging.getLogger(__name__)


def kv_server(store: Callable[[Header, np.ndarray], None], refused: tuple[type[Exception], ...],
              request_id_var: contextvars.ContextVar[str] | None = None) -> Handler:
    """A transport handler: `store(header, payload)` each message; an exception in `refused` is
    answered as an error frame, anything else acknowledged."""

    async def handle(conn: Connection) -> None:
        while True:
            try:
                header, payload = await stream_in(conn)
            except TransportError:
                return  # the sender went away; its requests are cleaned up by abort/expiry
            except WireError as exc:  # the frame was read whole: the link is still in step
                log.warning("malformed KV message: %s", exc)
                continue
            if request_id_var is not None:
                request_id_var.set(header.request_id)
            try:
                store(header, payload)
                await send_ack(conn, header)
            except refused as exc:
                log.warning("refused KV message: %s", exc)
                await send_error(conn, header, str(exc))
            except TransportError:
                return

    return handle
