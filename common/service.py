"""What every service process shares: logging that names the request, serving on a chosen or free
port, the registry lease, /health and /metrics, and fail-loud background tasks.

A service's lifecycle:
1. `main()` parses its settings (bad ones stop it here) and calls `run(app, settings)`.
2. `run` binds the HTTP socket first (so port 0 becomes a real port the lease can advertise),
   then uvicorn runs the app's lifespan, which creates clients (Redis, httpx, KV transport) and
   starts a `Lease`.
3. The lease writes the service's ServiceInfo to Redis every --lease-renew-s; if the process
   dies the entry lapses after --lease-ttl-s and the gateway stops routing to it.
4. A background task that dies takes the whole process down (`supervise`), so the lease lapses
   instead of a zombie answering /health.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import Awaitable, Callable

import httpx
import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from starlette.exceptions import HTTPException

from common.errors import PayloadTooLarge, error_body, install_error_handlers
from common.metadata import Registry
from common.protocol import CLUSTER_TOKEN_HEADER, ServiceInfo, ServiceKind, cluster_fingerprint
from common.settings import STOP_GRACE_S, ServiceSettings

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
log = logging.getLogger(__name__)


def printable(given: str) -> str:
    """A client's text (its own request id), fit for a log line: its first 128 characters, printable
    ones only."""
    return "".join(c for c in given[:128] if c.isprintable())


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class _StopCutFilter(logging.Filter):
    """uvicorn logs the requests its stop cut (open past the grace: a decode stream, a prefill) at
    ERROR: "Cancel N running task(s), timeout graceful shutdown exceeded", then each with a traceback,
    "Exception in ASGI application" over a CancelledError. An expected part of a stop (the gateway
    resumes such a request elsewhere), said here at INFO, in one line each, so that an alert on ERROR
    does not fire at every routine restart."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "uvicorn.error" or record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, asyncio.CancelledError) and "graceful shutdown" in str(exc):
            record.msg, record.args, record.exc_info, record.exc_text = "a request cut by the stop: %s", (exc,), None, None
        elif not str(record.msg).startswith("Cancel %s running task(s), timeout graceful shutdown"):
            return True
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def configure_logging(level: str, service_id: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_StopCutFilter())
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s {service_id} [%(request_id)s] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def service_id(kind: ServiceKind, settings: ServiceSettings) -> str:
    """Unique per start: a container restarted in place keeps its hostname and often its pid, and a
    request that failed on the old process must not take the new one for it (the gateway skips
    the services that failed a request)."""
    return settings.service_id or f"{kind.value}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when their proto
    # says TCP. Without it every response on a kept-alive connection (each /reserve, /prefill, each
    # decode-stream line, each SSE chunk) waited ~40 ms on Nagle and the peer's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def listen_kv(transport, handler, settings) -> str:
    """Start the KV listener; returns the address other services reach it at ("host:port")."""
    from common.kv.transport import split_address

    address = await transport.listen(handler, settings.host, settings.kv_port)
    return f"{settings.public_host}:{split_address(address)[1]}"


def supervise(task: asyncio.Task, what: str, expected: tuple[type[BaseException], ...] = ()) -> asyncio.Task:
    """A background task that fails kills the process: better dead (lease lapses) than a zombie.
    An `expected` failure (one said already, where it happened) is logged in a line, without a
    traceback."""

    def _done(t: asyncio.Task) -> None:
        if t.cancelled():
            return
        if (exc := t.exception()) is not None:
            log.critical("%s died: %r; exiting so that the lease lapses", what, exc,
                         exc_info=None if isinstance(exc, expected) else exc)
            logging.shutdown()
            os._exit(70)

    task.add_done_callback(_done)
    return task


RETRY_S = 0.05  # the first retry after a failed lease renewal; later ones back off to --lease-renew-s
# at start, Redis gets this long to answer the first registration: one slow answer on a host busy
# loading models (CI: a handshake timed out while ten processes loaded) or a Redis that comes up
# after the service (compose) is not a reason to exit; a Redis that never answers still is
START_WAIT_S = 20.0


class Lease:
    """Keeps this service's registry entry alive. `info()` gives the current ServiceInfo."""

    def __init__(self, registry: Registry, info: Callable[[], ServiceInfo], settings: ServiceSettings):
        self.registry, self.info, self.settings = registry, info, settings
        self.task: asyncio.Task | None = None
        self.last_ok = 0.0

    async def start(self) -> None:
        deadline, delay, failures = time.monotonic() + START_WAIT_S, RETRY_S, 0
        while True:
            try:
                await self.registry.renew(self.info(), self.settings.lease_ttl_s)
                break
            except (AuthenticationError, ResponseError):
                raise  # Redis answered, and no: a wrong password or a refused command stays so
            except (RedisError, OSError) as exc:
                failures += 1
                if time.monotonic() + delay > deadline:  # fail at start if Redis never answers
                    log.error("Redis did not answer in %.0f s (%d tries): %s", START_WAIT_S, failures, exc)
                    raise
                if failures == 1:
                    log.warning("registering in Redis failed (trying again for up to %.0f s): %s", START_WAIT_S, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        if failures:
            log.info("registered in Redis after %d failed tries", failures)
        self.last_ok = time.monotonic()
        self.task = supervise(asyncio.create_task(self._loop()), "lease renewal")

    async def _loop(self) -> None:
        """Renews every --lease-renew-s. After a failure it tries again sooner, from RETRY_S
        doubling up to --lease-renew-s: a restarted Redis has dropped every pooled connection, so the
        first renewal after a restart fails on a stale one, and waiting a whole period before the
        next kept the service unlisted (unroutable) for up to two periods after Redis came back."""
        delay, failures = self.settings.lease_renew_s, 0
        while True:
            await asyncio.sleep(delay)
            try:
                await self.registry.renew(self.info(), self.settings.lease_ttl_s)
            except (RedisError, OSError) as exc:  # Redis down: keep serving, keep trying
                if not failures:
                    log.warning("lease renewal failed (trying again, from every %.2f s): %s", RETRY_S, exc)
                failures += 1
                delay = min(self.settings.lease_renew_s, RETRY_S * 2 ** min(failures - 1, 30))
                continue
            if failures:
                log.info("lease renewed after %d failed tries", failures)
            self.last_ok, delay, failures = time.monotonic(), self.settings.lease_renew_s, 0

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        try:
            await self.registry.deregister(self.info().id)
        except (RedisError, OSError) as exc:
            log.warning("could not deregister: %s", exc)


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse whose `on_close` always runs, also when the client left before the
    body started (Starlette then never starts the generator, so its `finally` would not run)."""

    def __init__(self, content, on_close: Callable[[], Awaitable[None]], **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


@contextlib.asynccontextmanager
async def registered(app: FastAPI, settings: ServiceSettings, kind: ServiceKind, fields: Callable[[], dict]):
    """For a lifespan: connect to Redis and hold this service's lease in the registry (its
    ServiceInfo: the common fields plus `fields()`, read at every renewal), then say ready.
    Yields the Redis client; deregisters and closes on the way out."""
    from common.metadata import connect

    redis, started = connect(settings.redis_url, timeout_s=min(5.0, settings.lease_ttl_s / 2)), time.time()

    def info() -> ServiceInfo:
        return ServiceInfo(kind=kind, id=app.state.service_id, url=app.state.url, host=socket.gethostname(),
                           pid=os.getpid(), started_at=started, cluster=cluster_fingerprint(settings.cluster_token),
                           **fields())

    lease = Lease(Registry(redis), info, settings)
    try:
        await lease.start()
        ready_line(kind, app.state.url)
        yield redis
    finally:
        await lease.stop()
        await redis.aclose()


def cluster_headers(settings: ServiceSettings) -> dict[str, str]:
    """Headers of every call to another service of the cluster."""
    return {CLUSTER_TOKEN_HEADER: settings.cluster_token} if settings.cluster_token else {}


class RequireSecret:
    """401, OpenAI's way, for any call but the probes' (/health, /metrics) whose `header` does not
    carry one of `secrets` (after `scheme`, e.g. "Bearer"; or, without that header, alone in
    `bare_header`). Every secret is compared, in constant time: how long a refusal takes says
    nothing about them. Two uses:
    - the gateway's API keys (API_KEYS): /v1/*, /cluster (it names internal addresses), the
      OpenAPI pages, any route added later;
    - an internal service's cluster token (CLUSTER_TOKEN): a stranger who reaches the port can
      neither reserve, prefill, decode, restore, abort nor drop anything."""

    OPEN = ("/health", "/metrics")

    def __init__(self, app, secrets: tuple[str, ...], header: str, scheme: str, code: str, missing: str, wrong: str,
                 challenge: str = "", bare_header: str = ""):
        """`bare_header`: another header that may carry a secret, alone (Anthropic's x-api-key)."""
        self.app, self.secrets = app, [x.encode() for x in secrets]
        self.header, self.scheme, self.code = header.lower().encode(), scheme.lower().encode(), code
        self.bare = bare_header.lower().encode()
        self.missing, self.wrong, self.challenge = missing, wrong, challenge

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.OPEN:
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"])
        given = sent.get(self.header, b"")
        scheme, _, value = given.partition(b" ") if self.scheme else (b"", b"", given)
        if not given and self.bare and self.bare in sent:  # the secret alone, in the other header
            given = value = sent[self.bare]
            scheme = self.scheme
        if scheme.lower() == self.scheme and sum(hmac.compare_digest(x, value.strip()) for x in self.secrets):
            # which secret it was, for what the route keeps per key (the Responses API's store): the
            # very header checked here, not another copy of it a handler might read
            scope.setdefault("state", {})["secret_digest"] = secret_digest(value.strip())
            return await self.app(scope, receive, send)  # (the caller's length sets the time, not a secret's)
        log.info("refused %s %r from %s: %s", scope["method"], scope["path"][:200],
                    (scope.get("client") or ("?",))[0], self.wrong if given else self.missing)
        body = error_body(self.wrong if given else self.missing, "invalid_request_error", None, self.code)
        headers = {"WWW-Authenticate": self.challenge} if self.challenge else None
        await JSONResponse(body, status_code=401, headers=headers)(scope, receive, send)


def secret_digest(secret: bytes) -> str:
    """A name for a secret that does not give it away (RequireSecret's, for scope["state"])."""
    return hashlib.sha256(b"dejavu-secret:" + secret).hexdigest()[:32]


API_KEYS = dict(header="authorization", scheme="Bearer", code="invalid_api_key", challenge="Bearer",
                bare_header="x-api-key",  # as Anthropic's clients send it (/v1/messages)
                missing="no API key: send it as 'Authorization: Bearer KEY' (or 'x-api-key: KEY')",
                wrong="incorrect API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')")
CLUSTER_TOKEN = dict(header=CLUSTER_TOKEN_HEADER, scheme="", code="invalid_cluster_token",
                     missing="this endpoint is internal: it needs the cluster token (DEJAVU_CLUSTER_TOKEN)",
                     wrong="this endpoint is internal: it needs the cluster token (DEJAVU_CLUSTER_TOKEN)")


KEEP_ALIVE_S = 75  # idle keep-alive: past a 429's longest Retry-After (60 s), so a client that waited it out
#                    does not race our close with its next request on the same connection (uvicorn's 5 s did)
INTERNAL_MAX_BODY = 64 << 20  # bytes: a request of --max-model-len 1M token ids is ~8 MB of JSON


class BodyLimit:
    """413 for a body over the limit (by Content-Length, or counted as it streams in): on the
    gateway --max-body-bytes, on the internal services INTERNAL_MAX_BODY."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # an HTTPException passes FastAPI's body reader unchanged
                raise HTTPException(413, self._message())  # (written as a PayloadTooLarge: errors._http)
            return message

        return await self.app(scope, counting_receive, send)

    def _message(self) -> str:
        return f"request body is over the limit of {self.max_bytes} bytes; send a smaller request"

    async def _reject(self, send) -> None:
        err = PayloadTooLarge(self._message())
        await JSONResponse(err.body(), status_code=413)({"type": "http"}, None, send)


def internal_app(title: str, settings: ServiceSettings, lifespan) -> FastAPI:
    """A service's app for the cluster's own calls: OpenAI-style errors, bodies up to
    INTERNAL_MAX_BODY, and the cluster token required on every route but /health and /metrics."""
    app = FastAPI(title=title, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=INTERNAL_MAX_BODY)
    if settings.cluster_token:  # added last: it runs first
        app.add_middleware(RequireSecret, **CLUSTER_TOKEN, secrets=(settings.cluster_token,))
    return app


async def answers_health(url: str, timeout: float, client: httpx.AsyncClient | None = None) -> bool:
    """Whether the service at `url` answers GET /health with a 200 within `timeout` s (one whose
    lease is gone may be hung, dead, or registered in a Redis that restarted empty: this tells);
    over `client`, or a client of its own."""
    if not url:
        return False
    try:
        async with contextlib.nullcontext(client) if client is not None else httpx.AsyncClient() as c:
            return (await c.get(url + "/health", timeout=timeout)).status_code == 200
    except httpx.HTTPError:
        return False


def add_health_and_metrics(app: FastAPI, health: Callable[[], Awaitable[dict]] | None = None) -> None:
    """GET /health: 200 {"status": "ok", ...}; 503 when `health` says {"status": "unavailable",
    "reason": ...} (not ready: a probe should not send traffic here yet). HEAD too, as some load
    balancers' probes send it."""
    @app.get("/health")
    async def _health() -> JSONResponse:
        body = {"status": "ok", **(await health() if health else {})}
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    app.add_api_route("/health", _health, methods=["HEAD"], include_in_schema=False)  # one operation in the schema

    @app.get("/metrics")
    async def _metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


STOP_MARGIN_S = 1.0  # then uvicorn cancels what is still open, this much later


def run(app: FastAPI, settings: ServiceSettings, kind: ServiceKind) -> None:
    """Bind, publish the real URL on app.state, serve until SIGINT/SIGTERM."""
    sock = bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    app.state.service_id = service_id(kind, settings)
    app.state.url = f"http://{settings.public_host}:{port}"
    configure_logging(settings.log_level, app.state.service_id)
    log.info("%s listening on %s", kind.value, app.state.url)
    grace_s = getattr(settings, "stop_grace_s", STOP_GRACE_S)
    config = uvicorn.Config(app, log_level=settings.log_level, access_log=False, log_config=None,
                            timeout_graceful_shutdown=grace_s + STOP_MARGIN_S, timeout_keep_alive=KEEP_ALIVE_S)
    _Server(config, app, grace_s).run(sockets=[sock])


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app when its stop began: `app.state.stopped`, a future, is
    resolved `grace_s` after SIGTERM/SIGINT, STOP_MARGIN_S before uvicorn cancels what is still
    open, so that a request still open ends its own way (the gateway's: with an error saying the
    server is stopping, a stream's last event) instead of a connection cut mid-body."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_s: float):
        super().__init__(config)
        self.app, self.grace_s = app, grace_s

    async def startup(self, sockets=None) -> None:
        self.app.state.stopped = asyncio.get_running_loop().create_future()
        await super().startup(sockets)

    async def shutdown(self, sockets=None) -> None:
        stopped = self.app.state.stopped
        log.info("stopping: requests in flight have %.0f s to finish", self.grace_s)
        asyncio.get_running_loop().call_later(self.grace_s, lambda: stopped.done() or stopped.set_result(None))
        await super().shutdown(sockets)


def ready_line(kind: ServiceKind, url: str) -> None:
    """The line `dejavu up` (and tests) wait for on stdout."""
    print(f"DEJAVU_READY {kind.value} {url}", flush=True)


def main(kind: ServiceKind, settings_cls: type, description: str, app_factory: str,
         argv: list[str] | None = None) -> None:
    """Entry point of `python -m <service>`: settings (bad ones stop here, before any heavy
    import, so --help is instant), then the app from "module:function", then serve."""
    import importlib

    from common.settings import SettingsError, load

    prog = f"python -m {app_factory.split('.')[0]}"
    try:
        settings = load(settings_cls, sys.argv[1:] if argv is None else argv, prog=prog, description=description)
    except SettingsError as exc:
        sys.exit(f"{prog}: bad setting: {exc}")
    _openmp_wait_policy(os.environ)
    _numpy_hugepages(os.environ)
    module, func = app_factory.split(":")
    run(getattr(importlib.import_module(module), func)(settings), settings, kind)


def _openmp_wait_policy(env) -> None:
    """How long torch's OpenMP workers spin for more work before they sleep. Set before torch loads;
    an explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.

    libgomp's default spins ~3 ms after every parallel region: engines sharing cores with each other
    and with the gateway lose them to idle spinners (measured: 3.2x -> 3.8x HF tokens/s at 16
    concurrent on 2 cores with no spinning at all). But a worker that sleeps at once must be woken
    for each of a decode step's ~150 parallel ops: a 1-sequence SmolLM2 step took 47-53 ms instead
    of 35-41 (three alternated runs). 10,000 spins (~0.1 ms) bridge the gaps between one forward's
    ops, and idle workers still let go of the cores within a tenth of a millisecond."""
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = "10000"


def _numpy_hugepages(env) -> None:
    """numpy asks for transparent huge pages (madvise) for every array of 4 MiB or more. On this
    project's 2-core VMs (THP defrag "madvise") a fresh 256 MiB array filled at 0.17 GB/s with that
    advice and 2.1 GB/s without; the likely cause (inferred) is the kernel compacting memory to find
    huge pages at each fault. KV messages land in fresh arrays: in a replication microbenchmark a
    cache store's CPU was 1.7-2.9 s with the advice and 1.1-1.2 s without (docs/BENCHMARKS.md §5).
    Set before numpy loads; an explicit NUMPY_MADVISE_HUGEPAGE wins."""
    env.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")


def keep_freed_memory(limit: int) -> str:
    """Have glibc keep freed memory for reuse instead of handing it back to the kernel, for a process
    whose large buffers come and go (a cache store's replicas). By default a chunk over glibc's
    mmap threshold (128 KiB, raised as such chunks are freed, up to 32 MiB) is a mapping of its
    own, unmapped when freed, and the heap's free top is trimmed past twice that threshold: after a
    round of replicas was dropped the next round faulted every page in again. Here chunks up to 32
    MiB come from the heap and up to `limit` bytes (at most 2 GiB - 1) of its free top stay. The
    process's resident memory then stays near its peak; holes left between chunks of other sizes
    can keep it above what it holds. Returns "" or what could not be set (not glibc, or a glibc
    that refused a value)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return "not glibc: freed memory goes back to the system"
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    refused = [name for name, option, value in (("mmap threshold", M_MMAP_THRESHOLD, 32 << 20),
                                                ("trim threshold", M_TRIM_THRESHOLD, min(limit, 2**31 - 1)))
               if not mallopt(option, value)]
    return f"glibc refused its {' and '.join(refused)}" if refused else ""
