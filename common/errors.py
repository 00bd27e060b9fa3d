"""One exception tree; every service turns it into an HTTP response here, and only here.

    DejavuError                       500 server_error
    ├── BadRequest                    400 invalid_request_error   (the caller's fault: says what to change)
    │   └── ContextLengthExceeded     400 invalid_request_error / context_length_exceeded
    ├── NotFound                      404 invalid_request_error / model_not_found (or not_found)
    ├── PayloadTooLarge               413 invalid_request_error
    ├── Overloaded                    429 rate_limit_exceeded     (admission queue full or waited out; Retry-After)
    ├── Unavailable                   503 service_unavailable     (Redis down, no engine, ...)
    │   ├── KVFull                    503 service_unavailable / kv_full  (a token service has no room)
    │   └── ShuttingDown              503 service_unavailable / shutting_down  (the gateway's stop grace ran out)
    └── UpstreamError                 502 server_error            (another service failed the request)
        └── ResumeFailed              502 server_error / resume_failed  (its token service failed, not resumed)

The body is OpenAI's: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
import logging
import re
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)


class DejavuError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None
    public: str | None = None  # a 5xx's words for an outside client, where the status's own say too little

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param
        if code is not None:
            self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def client_body(self, request_id: str = "") -> dict:
        """The body for an outside client: a 4xx says what to change; a 5xx says only what happened,
        never the internal addresses and Redis errors of its message (the log has them, under the
        request id given here)."""
        if self.status < 500:
            return self.body()
        plain = self.public or {502: "an internal service failed while serving this request",
                 503: "the server is at capacity; retry later" if self.code == "kv_full"
                 else "the service is temporarily unavailable; retry later"}.get(self.status, "internal error")
        return error_body(plain + (f" (request {request_id})" if request_id else ""), self.type, None, self.code)


class BadRequest(DejavuError):
    status, type = 400, "invalid_request_error"


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"


class NotFound(DejavuError):
    status, type, code = 404, "invalid_request_error", "not_found"


class PayloadTooLarge(DejavuError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class Overloaded(DejavuError):
    """Too many requests waiting: retry after `retry_after` seconds (sent as the Retry-After header)."""
    status, type, code = 429, "rate_limit_exceeded", "rate_limit_exceeded"

    def __init__(self, message: str, code: str | None = None, retry_after: int = 1):
        super().__init__(message, code=code)
        self.retry_after = retry_after


class Unavailable(DejavuError):
    status, type, code = 503, "service_unavailable", "service_unavailable"


class KVFull(Unavailable):
    code = "kv_full"


class ShuttingDown(Unavailable):
    """The gateway was told to stop, and the request did not end within --stop-grace-s."""
    code = "shutting_down"
    public = "the server is stopping and this request did not finish in time: retry it"


class UpstreamError(DejavuError):
    status, type, code = 502, "server_error", "upstream_error"


class ResumeFailed(UpstreamError):
    """A request whose token service failed, and that could not be resumed elsewhere."""
    code = "resume_failed"
    public = "the token service serving this request failed and the request could not be resumed"


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_body(status: int, text: str) -> DejavuError:
    """Rebuild the error another service answered with (so a 503 kv_full stays a KVFull)."""
    try:
        err = json.loads(text)["error"]
        message, code = err["message"], err.get("code")
    except (ValueError, KeyError, TypeError):
        message, code = text[:500] or f"HTTP {status}", None
    if status == 503:
        return (KVFull if code == "kv_full" else Unavailable)(message)
    if status == 404:
        return NotFound(message)
    if 400 <= status < 500:
        return BadRequest(message, code=code)
    return UpstreamError(message)


def _param(loc: tuple) -> str | None:
    """The top-level field (pydantic appends union type tags like 'float' to the location)."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return parts[0] if parts else None


# what pydantic puts in an error's location for the member of a union it tried, not a field's name
_UNION_TAG = re.compile(r"^(?:float|int|str|bool|bytes|none|[a-z][a-z-]*\[.*\])$")


def _where(loc: tuple, body) -> str:
    """An error's location as the client sent it: 'temperature', not pydantic's 'temperature.float'
    (the union member it tried). An element the body holds there is kept (a logit_bias key "none"
    too); one it does not is dropped if it reads as a union tag (a missing field's name is kept)."""
    node, parts = body, []
    for p in loc:
        if isinstance(node, dict) and p in node:
            node = node[p]
        elif isinstance(node, list) and isinstance(p, int) and -len(node) <= p < len(node):
            node = node[p]
        elif _UNION_TAG.match(str(p)):
            continue
        else:
            node = None
        parts.append(str(p))
    return ".".join(parts)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    param = _param(tuple(first.get("loc", ())))
    where = _where(tuple(first.get("loc", ()))[1:], exc.body)  # messages.1.role: the field inside param
    if first.get("type") == "missing":
        return (f"'{where}' is required", param) if param else ("the body is required: a JSON object", None)
    return f"'{where}': {first.get('msg')}" if param else str(first.get("msg")), param


def install_error_handlers(app: FastAPI, public: bool = False) -> None:
    """OpenAI-style error bodies. Internal services answer 5xx with the whole message (the gateway
    reads it back, common.errors.from_body); the public gateway (`public`) answers plainly."""
    @app.exception_handler(DejavuError)
    async def _dejavu(request: Request, exc: DejavuError):
        if exc.status >= 500 and exc.code != "kv_full":  # a full token service is expected, not an incident
            log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        if public and exc.status < 500:
            _give_id(request, exc.status, exc.message)
        body = exc.client_body(_request_id()) if public else exc.body()
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        first = exc.errors()[0]
        if tuple(first.get("loc", ())) == ("body",) and first.get("type") != "missing":  # not an object
            # FastAPI parses a body as JSON only under a JSON content type; else it hands on the bytes
            # (curl -d without -H sends application/x-www-form-urlencoded)
            unparsed = isinstance(first.get("input"), (bytes, bytearray))
            sent = request.headers.get("content-type", "")
            message = "the body must be a JSON object" + (
                f", sent with 'Content-Type: application/json' (this request's: {sent or 'none'!r}; "
                "curl -d needs -H 'Content-Type: application/json')" if unparsed else "")
        if public:
            _give_id(request, 400, message)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        code = PayloadTooLarge.code if exc.status_code == 413 else None  # a body counted over the limit (BodyLimit)
        if public and exc.status_code < 500:
            _give_id(request, exc.status_code, message)
        # a 405 must say which methods the route takes (Allow, RFC 9110): Starlette puts it in the headers
        return JSONResponse(error_body(message, kind, code=code), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)


def _give_id(request: Request, status: int, message: str) -> None:
    """A request the gateway refuses before it had an id (a 4xx from checking it) gets one now: its
    answer's x-request-id (gateway.serving.RequestIds) and the log line that says why name it."""
    from common.service import printable, request_id_var

    if getattr(request.state, "request_ids", None):
        return  # served: it has its ids, and whatever refused it logged why
    request.state.request_ids = [uuid.uuid4().hex]
    request_id_var.set(request.state.request_ids[0])
    theirs = printable(request.headers.get("x-request-id", ""))
    log.info("%s %s -> %d%s: %s", request.method, request.url.path, status,
             f" (the client's X-Request-Id {theirs!r})" if theirs else "", message)


def _request_id() -> str:
    from common.service import request_id_var  # common.service imports this module

    rid = request_id_var.get()
    return "" if rid == "-" else rid
