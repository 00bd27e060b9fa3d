"""The KV message format: Header validation and encoding, then stream_out/stream_in over every
transport (UCX and TCP) with identical assertions."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import torch

from common.kv import (
    TRANSPORTS,
    Header,
    WireError,
    make_transport,
    send_ack,
    send_error,
    stream_in,
    stream_out,
)
from common.kv.wire import as_tensor

BOUND_S = 5.0  # bound on every wait that must not hang; never asserted as a latency
KV = Header("kv", "req-1", 3, 0, 2, 10, 14, "float32", (2, 4, 3), 96, 12345)
SLAB = dict(request_id="req-7", epoch=2, layer_start=4, layer_end=6, token_start=0, token_end=16)


# Header, no transport.


@pytest.mark.parametrize(
    "header",
    [
        KV,
        Header("ack", "req-1", 3, message="stored"),
        Header("error", "r", 0, message="no room"),
        dataclasses.replace(KV, dtype="bfloat16", nbytes=48),  # 2 bytes a value
    ],
)
def test_header_round_trips(header):
    raw = header.encode()
    assert Header.decode(raw) == header
    assert json.loads(raw)["shape"] == list(header.shape)


@pytest.mark.parametrize(
    "change",
    [
        dict(kind="kvv"),
        dict(epoch=-1),
        dict(epoch=True),
        dict(layer_start=3, layer_end=2),
        dict(token_start=15),
        dict(dtype="float33"),
        dict(dtype="bfloat17"),
        dict(dtype="object"),
        dict(dtype=7),
        dict(dtype="bfloat16"),  # nbytes is that of float32
        dict(shape=(2, 4, 4)),  # nbytes no longer matches
        dict(shape=[2, 4, 3]),
        dict(nbytes=95),
        dict(checksum=1 << 32),
        dict(request_id=7),
        dict(request_id=""),
        dict(request_id="r1\n2026-12-01 00:00:00 INFO forged log line"),  # ids go into log lines
        dict(request_id="x" * 129),
    ],
)
def test_header_rejects_bad_fields(change):
    with pytest.raises(WireError):
        dataclasses.replace(KV, **change)


def _raw(**change) -> bytes:
    fields = {**json.loads(KV.encode()), **change}
    return json.dumps({k: v for k, v in fields.items() if v is not None}).encode()


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff\xfe",
        b"not json",
        b"[1, 2]",
        _raw(epoch=None),  # missing field
        _raw(extra=1),
        _raw(epoch="3"),
        _raw(shape=7),
        _raw(shape=[2, 4, "3"]),
        _raw(nbytes=97),
        _raw(dtype="bfloat17"),
        _raw(dtype="float8_e4m3fn"),  # no wire dtype, though torch has it
    ],
)
def test_decode_rejects_malformed_headers(raw):
    with pytest.raises(WireError):
        Header.decode(raw)


# Over a transport.


@pytest_asyncio.fixture(params=TRANSPORTS)
async def link(request):
    """(sender connection, receiver connection) over a fresh transport pair."""
    server, client = make_transport(request.param), make_transport(request.param)
    accepted: asyncio.Queue = asyncio.Queue()

    async def hold(conn) -> None:
        accepted.put_nowait(conn)
        await asyncio.Event().wait()  # until the transport closes and cancels us

    try:
        sender = await client.connect(await server.listen(hold, "127.0.0.1"))
        yield sender, await asyncio.wait_for(accepted.get(), BOUND_S)
    finally:
        await client.close()
        await server.close()


async def transfer(sender, receiver, payload, alloc=None, **kw) -> tuple[Header, Header, np.ndarray]:
    """stream_out and stream_in at once: a big UCX send completes only once the peer receives."""
    sent, (header, got) = await asyncio.wait_for(
        asyncio.gather(stream_out(sender, payload, **SLAB, **kw), stream_in(receiver, alloc)), BOUND_S
    )
    return sent, header, got


ARRAYS = {
    "float32": np.arange(2 * 16 * 3 * 8, dtype=np.float32).reshape(2, 16, 3, 8),
    "float16": np.linspace(-1, 1, 600, dtype=np.float16).reshape(2, 3, 100),
    "int64": np.array([7], dtype=np.int64),
    "float32-6MiB": np.random.default_rng(0).random((2, 3, 1024, 256), dtype=np.float32),
    "empty": np.zeros((2, 0, 3), dtype=np.float32),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("which", ARRAYS)
async def test_numpy_slab_round_trips(link, which):
    sender, receiver = link
    sent, header, got = await transfer(sender, receiver, ARRAYS[which])
    assert header == sent
    assert (header.request_id, header.epoch) == ("req-7", 2)
    assert (header.layer_start, header.layer_end, header.token_start, header.token_end) == (4, 6, 0, 16)
    assert got.dtype == ARRAYS[which].dtype and got.shape == ARRAYS[which].shape
    np.testing.assert_array_equal(got, ARRAYS[which])
    assert header.checksum == (zlib.crc32(ARRAYS[which].tobytes()) if got.size else 0)


def kv_tensor(dtype: torch.dtype) -> torch.Tensor:
    """(layers, 2, tokens, kv_heads, head_dim) of `dtype`, with the values a bit-exact copy must
    keep too: infinities, a NaN, a negative zero."""
    kv = torch.randn(2, 2, 16, 3, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    kv.view(-1)[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    return kv


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw words: torch.equal on them is bit-exact (NaN and -0.0 included)."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.asyncio
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
async def test_torch_tensors_round_trip_bit_exactly_in_their_dtype(link, dtype):
    sender, receiver = link
    kv = kv_tensor(dtype)
    sent, header, got = await transfer(sender, receiver, kv)
    name = str(dtype).removeprefix("torch.")
    assert header == sent and header.dtype == name and header.nbytes == kv.numel() * kv.element_size()
    assert got.dtype == (np.int16 if dtype == torch.bfloat16 else np.dtype(name))  # bf16: its raw words
    back = as_tensor(header, got)
    assert back.dtype == dtype and back.shape == kv.shape
    assert torch.equal(bits(back), bits(kv))
    assert back.data_ptr() == got.ctypes.data  # a view of the received buffer, no copy


@pytest.mark.asyncio
async def test_raw_words_go_out_under_an_explicit_dtype(link):
    sender, receiver = link
    kv = kv_tensor(torch.bfloat16)
    words = kv.view(torch.int16).numpy()  # as the cache store holds a bf16 replica
    _, header, got = await transfer(sender, receiver, words, dtype="bfloat16")
    assert header.dtype == "bfloat16"
    assert torch.equal(bits(as_tensor(header, got)), bits(kv))

    with pytest.raises(ValueError, match="does not fit"):
        await stream_out(sender, words, **SLAB, dtype="float32")  # another itemsize
    with pytest.raises(WireError, match="bfloat17"):
        await stream_out(sender, words, **SLAB, dtype="bfloat17")
    with pytest.raises(ValueError, match="no numpy type"):
        await stream_out(sender, torch.zeros(4, dtype=torch.float8_e4m3fn), **SLAB)
    with pytest.raises(ValueError, match="not a 'bfloat16' payload"):
        as_tensor(header, got.view(np.uint16))


def test_wire_does_not_import_torch():
    code = "import sys, common.kv.wire; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


@pytest.mark.asyncio
async def test_non_contiguous_payload_is_refused(link):
    sender, _ = link
    with pytest.raises(ValueError, match="contiguous"):
        await stream_out(sender, np.zeros((4, 4), dtype=np.float32).T, **SLAB)
    with pytest.raises(ValueError, match="contiguous"):
        await stream_out(sender, torch.zeros(4, 4).T, **SLAB)


@pytest.mark.asyncio
async def test_stream_in_receives_into_the_allocators_buffer(link):
    sender, receiver = link
    cache = np.zeros((8, 16), dtype=np.float32)  # (layers, tokens)
    slab = np.ones((2, 16), dtype=np.float32)

    def place(header: Header) -> np.ndarray:  # the slab's rows of the cache, as bytes
        return cache[header.layer_start : header.layer_end].reshape(-1).view(np.uint8)

    _, _, got = await transfer(sender, receiver, slab, place)
    assert np.shares_memory(got, cache)
    assert cache[4:6].all() and not cache[:4].any() and not cache[6:].any()


@pytest.mark.asyncio
async def test_allocator_refusal_is_reraised_and_leaves_the_link_usable(link):
    sender, receiver = link

    def refuse(header: Header) -> np.ndarray:
        raise LookupError(f"unknown request {header.request_id}")

    with pytest.raises(LookupError, match="req-7"):
        await transfer(sender, receiver, ARRAYS["float32"], refuse)
    _, _, got = await transfer(sender, receiver, ARRAYS["float16"])
    np.testing.assert_array_equal(got, ARRAYS["float16"])


@pytest.mark.asyncio
async def test_acks_and_errors_name_the_message_they_answer(link):
    sender, receiver = link
    sent, kv, _ = await transfer(sender, receiver, ARRAYS["float32"])
    await send_ack(receiver, kv, "stored")
    await send_error(receiver, kv, "no room")
    ack, ack_payload = await asyncio.wait_for(stream_in(sender), BOUND_S)
    error, _ = await asyncio.wait_for(stream_in(sender), BOUND_S)
    assert (ack.kind, ack.message, ack_payload.size) == ("ack", "stored", 0)
    assert (error.kind, error.message) == ("error", "no room")
    for reply in (ack, error):
        assert reply == dataclasses.replace(sent, kind=reply.kind, message=reply.message,
                                            dtype="uint8", shape=(0,), nbytes=0, checksum=0)  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "header, payload",
    [
        (dataclasses.replace(KV, checksum=KV.checksum + 1), np.zeros(96, np.uint8)),  # checksum
        (KV, np.zeros(95, np.uint8)),  # size disagrees with the header
        (b'{"kind": "kv"}', np.zeros(96, np.uint8)),  # malformed header
        (_raw(dtype="bfloat17"), np.zeros(96, np.uint8)),  # unknown dtype
    ],
    ids=["checksum", "nbytes", "malformed", "dtype"],
)
async def test_bad_messages_raise_wire_error_and_leave_the_link_usable(link, header, payload):
    sender, receiver = link
    raw = header.encode() if isinstance(header, Header) else header
    sending = asyncio.create_task(sender.send(raw, payload))
    with pytest.raises(WireError):
        await asyncio.wait_for(stream_in(receiver), BOUND_S)
    await asyncio.wait_for(sending, BOUND_S)
    _, _, got = await transfer(sender, receiver, ARRAYS["float16"])  # the next one arrives whole
    np.testing.assert_array_equal(got, ARRAYS["float16"])


@pytest.mark.asyncio
async def test_payload_checksums_are_zlibs_crc32_inline_and_in_a_thread(monkeypatch):
    """Checksums come from zlib-ng (a dependency: 7x zlib's speed) and equal zlib's CRC-32, so a
    peer that fell back to zlib checks our frames and we check its; both the inline path and the
    thread path of a big payload."""
    from zlib_ng import zlib_ng

    from common.kv import wire

    assert wire.crc32 is zlib_ng.crc32
    data = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8)
    assert await wire._crc32(data) == zlib.crc32(data)
    monkeypatch.setattr(wire, "CRC_THREAD_MIN_BYTES", 1 << 20)
    assert await wire._crc32(data) == zlib.crc32(data)
