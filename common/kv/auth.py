"""The KV link's handshake: every connection opens with the cluster token (DEJAVU_CLUSTER_TOKEN).

    transport = authenticated(make_transport("ucx"), token)

The connecting side sends one frame, b"dejavu-hello:" + token, and waits for b"dejavu-ok"; the
listening side reads that frame first (a few seconds at most, no payload allowed), compares the
token in constant time, answers, and only then hands the connection to its handler. A peer
without the token never reaches a handler: it cannot stream KV into a row, fetch a replica or
fence anyone. Both transports get the same handshake, one round trip per connection (links are
long-lived; a replica fetch pays it once).
"""

from __future__ import annotations

import asyncio
import hmac
import logging

import numpy as np

from common.kv.transport import Connection, Handler, Transport, TransportError

log = logging.getLogger(__name__)
HELLO, OK, REFUSED = b"dejavu-hello:", b"dejavu-ok", b"dejavu-refused"
HELLO_TIMEOUT_S = 5.0


def authenticated(transport: Transport, token: str) -> Transport:
    """`transport` with the handshake; as it is when there is no token (a cluster run without one)."""
    return AuthenticatedTransport(transport, token) if token else transport


def _no_payload(header: bytes, nbytes: int) -> np.ndarray:
    if nbytes:
        raise TransportError(f"a handshake frame carries no payload ({nbytes} bytes offered)")
    return np.empty(0, dtype=np.uint8)


class AuthenticatedTransport(Transport):
    def __init__(self, inner: Transport, token: str):
        self.inner, self.hello = inner, HELLO + token.encode()
        self.name = inner.name

    async def listen(self, handler: Handler, host: str, port: int = 0) -> str:
        async def guarded(conn: Connection) -> None:
            try:
                header, _ = await asyncio.wait_for(conn.recv(_no_payload), HELLO_TIMEOUT_S)
                ok = hmac.compare_digest(self.hello, header)  # time follows the peer's length, not the token's
                await conn.send(OK if ok else REFUSED)
            except Exception as exc:  # noqa: BLE001 - a stranger's bytes: whatever they do, the link closes
                log.warning("KV connection dropped before its handshake: %s: %s", type(exc).__name__, exc)
                await conn.close()
                return
            if not ok:
                log.warning("KV connection refused: wrong or missing cluster token (DEJAVU_CLUSTER_TOKEN)")
                await conn.close()
                return
            await handler(conn)

        return await self.inner.listen(guarded, host, port)

    async def connect(self, address: str, timeout: float = 5.0) -> Connection:
        conn = await self.inner.connect(address, timeout)
        try:
            await conn.send(self.hello)
            answer, _ = await asyncio.wait_for(conn.recv(_no_payload), timeout)
        except (TransportError, asyncio.TimeoutError) as exc:
            await conn.close()
            raise TransportError(f"KV handshake with {address} failed: {type(exc).__name__}: {exc}") from exc
        except BaseException:  # cancelled (a caller's own timeout): no half-open link left behind
            await conn.close()
            raise
        if answer != OK:
            await conn.close()
            raise TransportError(f"the KV peer at {address} refused this service's cluster token "
                                 "(every service of a cluster needs the same DEJAVU_CLUSTER_TOKEN)")
        return conn

    async def close(self) -> None:
        await self.inner.close()
