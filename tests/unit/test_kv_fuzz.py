"""Issue #10, the proof by fuzzing of the KV receive path: hypothesis-generated frames against the
real receiver (common/kv/receiver.py's kv_server in front of a cache store's ReplicaStore, behind
the cluster token's handshake, as cache_store/app.py runs it), over both transports.

Whatever a peer that holds the token sends:
- a frame the receiver can read whole (random header bytes; JSON with missing, extra or mistyped
  fields; absurd shapes; dtypes that do not exist; a payload of another length than the header
  says; JSON nested thousands deep) is answered (ack or error frame) or skipped, and the same link
  answers the next good frame with an ack;
- a frame that claims more than the receiver takes (a payload over its max_payload, a header over
  MAX_HEADER_LEN) closes that one link, unread: the only frames that may close a link. The other
  link and the listener serve on;
- nothing near a claimed size is allocated: the memory traced while the receiver handles a frame
  (tracemalloc counts numpy's buffers, even ones never touched) stays under max_payload plus a
  fixed slack for the parsed header;
- nothing fails unexpectedly: no ERROR is logged (the receiver logs a refusal or a malformed
  frame as a WARNING and an exception it did not expect as an ERROR).
"""

from __future__ import annotations

import asyncio
import json
import logging
import tracemalloc
import zlib

import numpy as np
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cache_store.store import Refused, ReplicaStore
from common.kv import TRANSPORTS, Header, TransportError, make_transport, stream_in, stream_out
from common.kv.receiver import kv_server
from common.kv.transport import FRAME_PREFIX, MAX_HEADER_LEN
from common.kv.wire import numpy_dtype

pytestmark = pytest.mark.asyncio(loop_scope="module")  # one receiver per transport for every example
BOUND_S = 5.0  # bound on waits that must not hang; never asserted as a latency
TOKEN = "fuzz-cluster-token"
MAX_PAYLOAD = 1 << 20  # the receiver's limit: its largest legitimate message
SLACK = 4 << 20  # memory a frame may cost beyond its payload: the parsed header (10,000 nested lists ~ 1 MB)
LAYERS, HEADS, DIM = 2, 2, 4
PROBE = "probe-" + "0" * 40  # the good frame after each example: no generated id is this one
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Frames, as (header bytes, payload bytes).

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
DTYPES = ("float32", "float16", "bfloat16", "int8")
ODD_DTYPES = st.sampled_from(["object", "O", "V8", "S4", "U2", "complex64", "float32,int8", "(2,)f4", "M8[s]", "<f4",
                              ">f4", "f4", "float128", "bool", "float", "bfloat16 ", "", "\x00", "[('a', '<f4')]"])
HUGE = st.integers(-(2**200), 2**200) | st.sampled_from([2**31, 2**63, 2**64, -1, 10**4000])
SHAPES = (st.lists(HUGE | st.integers(-4, 8), max_size=100)  # many dims, negative, huge
          | st.lists(st.integers(0, 2**40), min_size=1, max_size=8))  # a well-formed claim of terabytes


def encode(fields) -> bytes:
    return json.dumps(fields, allow_nan=True).encode()


@st.composite
def kv_frames(draw) -> tuple[dict, bytes]:
    """A well-formed "kv" message for one of a few requests: it may continue, trim, fence or gap
    a replica, or have another dtype than the replica's (the store refuses some: error frames)."""
    tokens, start, dtype = draw(st.integers(0, 4)), draw(st.integers(0, 6)), draw(st.sampled_from(DTYPES))
    shape = [LAYERS, 2, tokens, HEADS, DIM]
    n = int(np.prod(shape)) * numpy_dtype(dtype).itemsize
    payload = draw(st.binary(min_size=n, max_size=n))
    return dict(kind="kv", request_id=draw(st.sampled_from("abc")), epoch=draw(st.integers(0, 3)), layer_start=0,
                layer_end=LAYERS, token_start=start, token_end=start + tokens, dtype=dtype, shape=shape, nbytes=n,
                checksum=zlib.crc32(payload), message=""), payload


@st.composite
def other_kinds(draw) -> tuple[dict, bytes]:
    """A "fetch" (answered with a "kv" message or an error), or an "ack" or "error" (a receiver takes none)."""
    fields = Header(draw(st.sampled_from(["fetch", "ack", "error"])), draw(st.sampled_from("abc")),
                    draw(st.integers(0, 3)), token_end=draw(st.integers(0, 8)))
    return json.loads(fields.encode()), b""


MUTATIONS = {"json": JSON, "huge": HUGE, "shape": SHAPES, "dtype": ODD_DTYPES | st.text(max_size=12)}


@st.composite
def mutated(draw) -> tuple[bytes, bytes]:
    """A good frame with fields dropped, added or replaced: wrong types, absurd numbers and shapes,
    dtypes that do not exist; its payload kept or replaced by one of another length."""
    fields, payload = draw(kv_frames() | other_kinds())
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(fields)))
        action = draw(st.sampled_from(["drop", "add", *MUTATIONS]))
        if action == "drop":
            fields.pop(name, None)
        elif action == "add":
            fields[draw(st.text(min_size=1, max_size=8))] = draw(JSON)
        elif action in ("shape", "dtype"):
            fields[action] = draw(MUTATIONS[action])
        else:
            fields[name] = draw(MUTATIONS[action])
    if draw(st.booleans()):
        payload = bytes(draw(st.integers(0, 512) | st.just(MAX_PAYLOAD)))  # zeros, up to the limit exactly
    return encode(fields), payload


@st.composite
def nested(draw) -> tuple[bytes, bytes]:
    """JSON nested thousands deep: the whole header, or one field of a good one."""
    depth = draw(st.integers(100, 10_000))
    deep = draw(st.sampled_from([b"[" * depth + b"]" * depth, b'{"a":' * depth + b"0" + b"}" * depth]))
    fields, payload = draw(kv_frames())
    name = draw(st.sampled_from([None, "shape", "request_id", "dtype", "epoch"]))
    if name is None:
        return deep, payload
    return encode({**fields, name: "DEEP"}).replace(b'"DEEP"', deep), payload


def put_then_fetch(request_id: str, tokens: int) -> list[tuple[bytes, bytes]]:
    """A good "kv" message, then a "fetch" of it: answered with an ack, then a "kv" message."""
    payload = np.ones((LAYERS, 2, tokens, HEADS, DIM), dtype=np.float32).tobytes()
    put = Header("kv", request_id, 0, 0, LAYERS, 0, tokens, "float32", (LAYERS, 2, tokens, HEADS, DIM), len(payload),
                 zlib.crc32(payload))
    return [(put.encode(), payload), (Header("fetch", request_id, 0, token_end=tokens).encode(), b"")]


READABLE_FRAMES = (
    st.tuples(st.binary(max_size=200), st.binary(max_size=64))  # random header bytes
    | mutated()
    | nested()
    | kv_frames().map(lambda f: (encode(f[0]), f[1]))
    | other_kinds().map(lambda f: (encode(f[0]), f[1]))
)


# The receiver, and what is checked around each frame.


class Rig:
    """A receiver as a cache store runs it, a client transport with the same token, and one long
    link: the receiver's answers are read from it in order."""

    def __init__(self, kind: str, spill_dir: str):
        self.kind, self.store = kind, ReplicaStore(memory_bytes=4 * MAX_PAYLOAD, spill_dir=spill_dir)
        self.server, self.client = make_transport(kind, TOKEN), make_transport(kind, TOKEN)
        self.errors: list[logging.LogRecord] = []

    async def start(self) -> None:
        fetch = lambda h: self.store.fetch(h.request_id, h.epoch, h.token_end)  # noqa: E731 - as cache_store/app.py
        handler = kv_server(self.store.put, (Refused,), fetch=fetch, max_payload=MAX_PAYLOAD)
        self.address = await self.server.listen(handler, "127.0.0.1")
        self.link = await self.client.connect(self.address)

    async def answers_until_probe(self, conn) -> list[Header]:
        """Send the good frame and read every answer up to its ack: the answers to earlier frames."""
        await stream_out(conn, np.ones((LAYERS, 2, 1, HEADS, DIM), dtype=np.float32), request_id=PROBE, epoch=0,
                         layer_start=0, layer_end=LAYERS, token_start=0, token_end=1)
        answers = []
        while True:
            header, _ = await asyncio.wait_for(stream_in(conn), BOUND_S)
            if header.request_id == PROBE:
                assert header.kind == "ack", header
                return answers
            answers.append(header)

    async def close(self) -> None:
        await self.client.close()
        await self.server.close()
        self.store.close()


class TracedPeak:
    """Bytes allocated at the peak inside the block, over what was allocated on entry (tracemalloc:
    numpy reports its buffers to it, so a lazily touched terabyte counts in full)."""

    def __enter__(self) -> "TracedPeak":
        tracemalloc.reset_peak()
        self.before, self.grown = tracemalloc.get_traced_memory()[0], 0
        return self

    def __exit__(self, *exc) -> None:
        self.grown = tracemalloc.get_traced_memory()[1] - self.before


class ErrorRecords(logging.Handler):
    def __init__(self, records: list):
        super().__init__(logging.ERROR)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=TRANSPORTS)
async def rig(request, tmp_path_factory):
    rig = Rig(request.param, str(tmp_path_factory.mktemp("spill")))
    handler = ErrorRecords(rig.errors)
    logging.getLogger().addHandler(handler)
    tracemalloc.start()
    await rig.start()
    try:
        yield rig
    finally:
        tracemalloc.stop()
        logging.getLogger().removeHandler(handler)
        await rig.close()


def assert_no_errors_logged(rig: Rig) -> None:
    assert not rig.errors, [r.getMessage() + "\n" + (r.exc_text or "") for r in rig.errors]


@settings(FUZZ, max_examples=150)
@given(frames=st.lists(READABLE_FRAMES, min_size=1, max_size=3))
@example(frames=put_then_fetch("explicit", 3))
@example(frames=[(encode({"kind": "kv", "request_id": "r", "epoch": 0, "layer_start": 0, "layer_end": 1,
                          "token_start": 0, "token_end": 1, "dtype": "uint8", "shape": [2**40], "nbytes": 2**40,
                          "checksum": 0, "message": ""}), b"\0" * 16)])  # claims a terabyte, carries 16 bytes
async def test_frames_read_whole_are_answered_or_skipped_and_the_link_stays_up(rig, frames):
    """Up to three frames on the long link, then the good one: it is acknowledged on the same link,
    after at most one answer per frame; the store stays within its memory cap."""
    with TracedPeak() as peak:
        for header, payload in frames:
            await rig.link.send(header, payload)
        answers = await rig.answers_until_probe(rig.link)  # the frames before it were all handled
    assert len(answers) <= len(frames) and all(a.kind in ("ack", "error", "kv") for a in answers), answers
    assert not rig.link.closed and rig.store.bytes_held <= rig.store.memory_bytes
    assert peak.grown < MAX_PAYLOAD + SLACK, f"{peak.grown} B allocated for {[len(p) for _, p in frames]} B of payload"
    assert_no_errors_logged(rig)


async def send_claim(kind: str, conn, header_len: int, payload_len: int, header: bytes) -> None:
    """The opening of a frame that claims `header_len` and `payload_len` bytes, and nothing after
    the header (none at all past MAX_HEADER_LEN): what Connection.send never writes, so it goes
    under the transport, through the connection's own socket (TCP) or tagged endpoint (UCX)."""
    prefix = FRAME_PREFIX.pack(header_len, payload_len)
    opening = prefix + header if header_len <= MAX_HEADER_LEN else prefix
    conn = conn.inner  # under the shared-memory layer too (common/kv/shm.py)
    if kind == "tcp":
        await asyncio.get_running_loop().sock_sendall(conn._sock, opening)
    else:  # UCX: the prefix and the header are one tagged message, the frame's head
        await conn._call("send", np.frombuffer(opening, dtype=np.uint8))


CLAIMS = st.one_of(
    st.tuples(st.just(None), st.integers(MAX_PAYLOAD + 1, 2**64 - 1)),  # a payload over the limit
    st.tuples(st.integers(MAX_HEADER_LEN + 1, 2**64 - 1), st.integers(0, 2**64 - 1)),  # a header over its limit
)


@settings(FUZZ, max_examples=25)
@given(claim=CLAIMS, header=READABLE_FRAMES.map(lambda frame: frame[0]))
@example(claim=(None, 2**40), header=b'{"kind": "kv"}')  # a terabyte
@example(claim=(MAX_HEADER_LEN + 1, 0), header=b"")
async def test_a_frame_over_the_limits_closes_only_its_link_unread(rig, claim, header):
    """The receiver closes a link on such a frame (it cannot read a payload it will not allocate,
    and without reading it the link is out of step): a new link must work, and the other one too."""
    header_len, payload_len = claim
    conn = await rig.client.connect(rig.address)
    try:
        with TracedPeak() as peak:
            await send_claim(rig.kind, conn, len(header) if header_len is None else header_len, payload_len, header)
            with pytest.raises(TransportError):
                await asyncio.wait_for(conn.recv(), BOUND_S)  # closed, nothing answered
        assert peak.grown < MAX_PAYLOAD + SLACK, f"{peak.grown} B allocated for a claim of {payload_len} B"
    finally:
        await conn.close()
    fresh = await rig.client.connect(rig.address)
    try:
        assert await rig.answers_until_probe(fresh) == []
    finally:
        await fresh.close()
    assert await rig.answers_until_probe(rig.link) == []
    assert_no_errors_logged(rig)
