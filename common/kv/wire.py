"""The KV message format, on top of any transport `Connection`.

Every message is one transport frame:

    header:  compact UTF-8 JSON of `Header` (its fields, nothing else)
    payload: the tensor's raw bytes, C order, `header.nbytes` long (empty for "ack"/"error")

A "kv" message carries one slab of the KV cache: layers [layer_start, layer_end) and tokens
[token_start, token_end) of a request, as a tensor of `dtype` and `shape`, with a CRC-32 of the
bytes. A KV slab is token-major, (layers, 2, tokens, kv_heads, head_dim): the layout of the token
service's paged pool, so one indexed copy moves a message in or out. The receiver answers on the
same connection with an "ack" (stored) or an "error" frame; a frame that breaks the format gets
an "error" frame too when its header's request id, epoch and ranges are valid (the sender matches
answers by them), and none when they are not.

A "fetch" message (empty payload) asks a cache store for tokens [0, token_end) of a request's
replica under `epoch`; the store answers with one "kv" message of them, or an "error" frame.

Dtypes: `dtype` names the payload's element type, a numpy name ("float32", "float16", "int16",
"uint8", ...) or "bfloat16". bfloat16 has no numpy type, so its payload travels and arrives as its
raw 2-byte words: stream_out sends a bf16 tensor through `t.view(torch.int16).numpy()`, stream_in
returns an int16 array, and `as_tensor` views it back as bfloat16. No step copies the payload.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from common.kv.transport import Connection, TransportError

if TYPE_CHECKING:
    import torch

KINDS = ("kv", "ack", "error", "fetch")
INT_FIELDS = ("epoch", "layer_start", "layer_end", "token_start", "token_end", "nbytes", "checksum")
ANSWER_FIELDS = ("request_id", "epoch", "layer_start", "layer_end", "token_start", "token_end")
# The payload checksum is CRC-32 (zlib's), computed by zlib-ng where it is installed (a dependency):
# with the CPU's carry-less multiply it ran at 28 GB/s on this project's VMs against zlib's 3.8, and
# every KV message is checksummed twice (sender and receiver). The values are the same: a peer with
# either one checks the other's frames.
try:
    from zlib_ng.zlib_ng import crc32
    CRC_THREAD_MIN_BYTES = 64 << 20  # ~2 ms inline with carry-less multiply (a CPU without it: several times that)
except ImportError:  # a platform without a zlib-ng wheel
    from zlib import crc32
    CRC_THREAD_MIN_BYTES = 4 << 20
# Wire dtypes numpy cannot name, and the numpy dtype of the raw words each travels as.
RAW_DTYPES = {"bfloat16": np.dtype(np.int16)}

# Given the decoded header of an incoming frame, return a writable C-contiguous uint8 array of
# exactly `header.nbytes` to receive the payload into (e.g. a view of a preallocated cache). It
# may raise to refuse the message: stream_in reads the payload into scratch, then re-raises.
HeaderAllocator = Callable[["Header"], np.ndarray]


MAX_DIMS = 8  # a KV payload has 5; a header claiming more is malformed
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # as common.protocol.RequestId: it goes into log lines


# How an "error" frame's message starts when a cache store refuses a write or fetch because the
# sender's epoch is old (a fenced owner): the sender stops replicating the request for good.
FENCED = "fenced: "


class WireError(ValueError):
    """A message broke the format: bad header, size or checksum mismatch. `answer_to`, set by
    stream_in for a frame it read whole: the request id, epoch and ranges of that frame's header,
    enough to answer it with an error frame its sender matches, or None when those are not all
    there and valid (see `_answerable`)."""

    answer_to: Header | None = None


@dataclasses.dataclass(frozen=True)
class Header:
    kind: str  # "kv" | "ack" | "error" | "fetch"
    request_id: str
    epoch: int  # the sender's view of the request's epoch; stale epochs are ignored upstream
    layer_start: int = 0  # layers [layer_start, layer_end)
    layer_end: int = 0
    token_start: int = 0  # token positions [token_start, token_end)
    token_end: int = 0
    dtype: str = "uint8"  # element type: a numpy dtype name or "bfloat16" (see numpy_dtype)
    shape: tuple[int, ...] = (0,)  # payload tensor shape
    nbytes: int = 0  # payload size in bytes = prod(shape) * itemsize
    checksum: int = 0  # CRC-32 (zlib's) of the payload bytes; 0 when empty
    message: str = ""  # human-readable detail of an "ack"/"error"

    def __post_init__(self) -> None:
        _check(self.kind in KINDS, f"kind must be one of {KINDS}, got {self.kind!r}")
        _check(isinstance(self.request_id, str) and REQUEST_ID.fullmatch(self.request_id) is not None,
               "request_id must be 1-128 of A-Z a-z 0-9 . _ : -")
        _check(isinstance(self.message, str), "message must be a str")
        for name in INT_FIELDS:
            value = getattr(self, name)
            _check(type(value) is int and value >= 0, f"{name} must be an int >= 0, got {value!r}")
        _check(self.layer_start <= self.layer_end, "layer_start > layer_end")
        _check(self.token_start <= self.token_end, "token_start > token_end")
        _check(self.checksum < 1 << 32, "checksum must fit in 32 bits")
        _check(isinstance(self.shape, tuple) and len(self.shape) <= MAX_DIMS, f"shape must be a tuple of at most {MAX_DIMS} dims")
        _check(all(type(d) is int and d >= 0 for d in self.shape), f"bad shape {self.shape!r}")
        size = math.prod(self.shape) * numpy_dtype(self.dtype).itemsize
        _check(size == self.nbytes, f"nbytes {self.nbytes} != {size} for {self.dtype}{self.shape}")

    def encode(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Header:
        """Parse a header; anything malformed raises WireError."""
        try:
            fields = json.loads(raw)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; deep nesting recurses
            raise WireError(f"header is not JSON: {type(e).__name__}") from None
        _check(isinstance(fields, dict), "header must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        missing, unexpected = sorted(names - fields.keys()), sorted(fields.keys() - names)
        _check(not missing and not unexpected, f"header fields missing: {missing}, unexpected: {unexpected}")
        _check(isinstance(fields["shape"], list), "shape must be a list")
        return cls(**{**fields, "shape": tuple(fields["shape"])})


async def stream_out(
    conn: Connection,
    payload: np.ndarray | torch.Tensor,
    *,
    request_id: str,
    epoch: int,
    layer_start: int,
    layer_end: int,
    token_start: int,
    token_end: int,
    dtype: str | None = None,
) -> Header:
    """Send one "kv" message; returns the header sent. The payload is not copied: a contiguous
    CPU numpy array, or torch tensor (sent through `.numpy()`, a view; bfloat16 through
    `.view(torch.int16).numpy()`). `dtype` names the wire dtype of a numpy array of raw words
    (e.g. "bfloat16" for int16 ones); by default, the payload's own. Raises ValueError for a
    payload that cannot go as it is (or a `dtype` of another itemsize), TransportError."""
    array, name = _as_numpy(payload)
    if dtype is not None:
        if numpy_dtype(dtype).itemsize != array.itemsize:
            raise ValueError(f"dtype {dtype!r} does not fit a payload of {array.dtype}")
        name = dtype
    data = array.reshape(-1).view(np.uint8)
    header = Header(
        "kv", request_id, epoch, layer_start, layer_end, token_start, token_end,
        dtype=name, shape=tuple(array.shape), nbytes=data.nbytes, checksum=await _crc32(data),
    )  # fmt: skip
    await conn.send(header.encode(), data)
    return header


async def send_fetch(conn: Connection, request_id: str, epoch: int, tokens: int, layers: range | None = None) -> Header:
    """Ask for tokens [0, tokens) of a replica, of `layers` (every one by default); read the answer
    with stream_in. Raises TransportError (ValueError for no layer: on the wire, (0, 0) means all)."""
    if layers is not None and not layers:
        raise ValueError(f"a fetch of {request_id} for no layer ({layers})")
    header = Header("fetch", request_id, epoch, token_end=tokens,
                    **({"layer_start": layers.start, "layer_end": layers.stop} if layers is not None else {}))
    await conn.send(header.encode())
    return header


async def send_ack(conn: Connection, kv: Header, message: str = "") -> None:
    """Answer the "kv" message `kv`: stored. The reply names the same request, layers and tokens."""
    await conn.send(_reply("ack", kv, message).encode())


async def send_error(conn: Connection, kv: Header, message: str) -> None:
    """Answer the "kv" (or "fetch") message `kv`: refused, and why."""
    await conn.send(_reply("error", kv, message).encode())


async def stream_in(
    conn: Connection, alloc: HeaderAllocator | None = None, max_payload: int | None = None
) -> tuple[Header, np.ndarray]:
    """Receive one message: (header, payload as an array of header.shape, a view of the received
    buffer). The array's dtype is `numpy_dtype(header.dtype)`: int16 raw words for "bfloat16";
    `as_tensor` gives the payload as a tensor of its real dtype. Raises TransportError if the
    connection breaks, WireError if the message is malformed. After a WireError, or an exception
    raised by `alloc` (re-raised here), the frame has been read whole: the link is still usable,
    and the WireError's `answer_to` says whether the frame can be answered with an error frame.
    A frame whose payload is over `max_payload` bytes is not read at all: TransportError (the
    receiver closes that link; a peer that sends it is broken or hostile)."""
    problem: list[Exception] = []  # raised only once the whole frame is read

    def place(raw: bytes, nbytes: int) -> np.ndarray:
        if max_payload is not None and nbytes > max_payload:
            raise TransportError(f"a frame of {nbytes} bytes, over this receiver's limit of {max_payload}")
        try:
            header = Header.decode(raw)
            _check(header.nbytes == nbytes, f"header says {header.nbytes} B, frame has {nbytes}")
            if alloc is not None:
                return alloc(header)
        except Exception as e:
            problem.append(e)  # the payload still has to be read, into scratch, to stay in step
        return np.empty(nbytes, dtype=np.uint8)

    raw, data = await conn.recv(place)
    try:
        if problem:
            raise problem[0]
        header = Header.decode(raw)
        _check(await _crc32(data) == header.checksum, f"checksum mismatch for {header.request_id!r}")
    except WireError as e:
        e.answer_to = _answerable(raw)
        raise
    return header, data.view(numpy_dtype(header.dtype)).reshape(header.shape)


def as_tensor(header: Header, array: np.ndarray) -> torch.Tensor:
    """The payload `array` of a message (as stream_in returns it) as a CPU torch tensor of
    `header.dtype`, sharing its memory: a bfloat16 payload's int16 words are viewed as bf16."""
    import torch  # here, not at the top: the wire format itself does not need torch

    if array.dtype != numpy_dtype(header.dtype):
        raise ValueError(f"a {array.dtype} array is not a {header.dtype!r} payload")
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if header.dtype == "bfloat16" else tensor


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype a payload of wire dtype `name` is held in (its raw words for a dtype numpy
    lacks, e.g. int16 for "bfloat16"). Raises WireError for a name that is not a wire dtype."""
    _check(isinstance(name, str), f"dtype must be a str, got {name!r}")
    if name in RAW_DTYPES:
        return RAW_DTYPES[name]
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError):
        raise WireError(f"unknown dtype {name!r}") from None
    _check(dtype.kind in "biuf" and dtype.name == name, f"unsupported dtype {name!r}")
    return dtype


async def _crc32(data: np.ndarray) -> int:
    # A big payload's checksum would stall the event loop for ms, so it runs in a thread (both
    # implementations release the GIL); a small one is cheaper inline than a thread hop.
    if data.nbytes < CRC_THREAD_MIN_BYTES:
        return crc32(data)
    return await asyncio.to_thread(crc32, data)


def _reply(kind: str, kv: Header, message: str) -> Header:
    return Header(kind, kv.request_id, kv.epoch, kv.layer_start, kv.layer_end,
                  kv.token_start, kv.token_end, message=message)  # fmt: skip


def _answerable(raw: bytes) -> Header | None:
    """From the header `raw` of a frame that broke the format, the fields its error answer needs:
    the ones the sender matches answers by (request_id, layer_start, token_start: peers.ack_key),
    its epoch and ranges. None unless they all parse and validate as in any header (request_id as
    REQUEST_ID, ints >= 0, starts <= ends): nothing else of `raw` is read."""
    try:
        fields = json.loads(raw)
        _check(isinstance(fields, dict), "header must be a JSON object")
        return Header("error", *(fields.get(name) for name in ANSWER_FIELDS))
    except (ValueError, RecursionError):  # WireError is a ValueError
        return None


def _as_numpy(payload: np.ndarray | torch.Tensor) -> tuple[np.ndarray, str]:
    """(the payload as a numpy view, its wire dtype name)."""
    if isinstance(payload, np.ndarray):
        array, name = payload, payload.dtype.name
    else:
        array, name = _tensor_as_numpy(payload)
    if not array.flags.c_contiguous:
        raise ValueError("KV payload must be C-contiguous: call .contiguous() first")
    return array, name


def _tensor_as_numpy(tensor: torch.Tensor) -> tuple[np.ndarray, str]:
    import torch  # already loaded: the caller holds a tensor

    if tensor.device.type != "cpu":
        raise ValueError(f"KV payload must be on the CPU, not {tensor.device}")
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:  # no numpy type: its raw words travel
        return tensor.view(torch.int16).numpy(), "bfloat16"
    try:
        array = tensor.numpy()  # shares the tensor's memory
    except TypeError as e:
        raise ValueError(f"{tensor.dtype} cannot go on the wire: it has no numpy type") from e
    return array, array.dtype.name


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise WireError(message)
