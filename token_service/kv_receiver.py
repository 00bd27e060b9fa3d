"""The token service's end of the KV stream: one task per incoming connection reads KV messages,
scatters each into its sequence's slot, and answers each with an ack (or an error frame that
names the problem; the link stays up for the other requests on it)."""

from __future__ import annotations

import logging

from common.kv.transport import Connection, TransportError
from common.kv.wire import WireError, send_ack, send_error, stream_in
from common.service import request_id_var
from token_service.engine import KVMessageError, TokenEngine

log = logging.getLogger(__name__)


def make_handler(engine: TokenEngine):
    async def handle(conn: Connection) -> None:
        while True:
            try:
                header, payload = await stream_in(conn)
            except TransportError:
                return  # the sender went away; its requests are cleaned up by abort/expiry
            except WireError as exc:  # the frame was read whole: the link is still in step
                log.warning("malformed KV message: %s", exc)
                continue
            request_id_var.set(header.request_id)
            try:
                engine.receive_kv(header, payload)
                await send_ack(conn, header)
            except KVMessageError as exc:
                log.warning("refused KV message: %s", exc)
                await send_error(conn, header, str(exc))
            except TransportError:
                return

    return handle

