"""The cache store's replicas: put/fetch semantics (fresh, continued, trimmed, refused), spilling
past the memory budget, dtypes kept (bfloat16 as raw words), and fetch end to end over every
transport (UCX and TCP)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import time

import numpy as np
import pytest
import pytest_asyncio
import torch
from prometheus_client import REGISTRY

from cache_store.store import BadChunk, Refused, ReplicaGap, ReplicaStore, StaleEpoch, StoreFull
from common.kv import TRANSPORTS, Header, make_transport, send_fetch, stream_in
from common.kv.fetch import FetchError, fetch_replica
from common.kv.peers import KVRejected, Peers
from common.kv.receiver import kv_server

BOUND_S = 5.0  # bound on every wait that must not hang; never asserted as a latency
LAYERS, HEADS, DIM = 3, 2, 4
TOKEN_BYTES = LAYERS * 2 * HEADS * DIM * 4  # float32


def kv(tokens: int, seed: int = 0, heads: int = HEADS) -> np.ndarray:
    """(layers, 2, tokens, kv_heads, head_dim), distinct values per seed."""
    return np.random.default_rng(seed).standard_normal((LAYERS, 2, tokens, heads, DIM), dtype=np.float32)


def bf16(tokens: int, seed: int = 0) -> torch.Tensor:
    """kv() as bfloat16, with a NaN and a -0.0 that a bit-exact copy must keep."""
    t = torch.from_numpy(kv(tokens, seed)).to(torch.bfloat16)
    t.view(-1)[:2] = torch.tensor([float("nan"), -0.0])
    return t


def words(t: torch.Tensor) -> np.ndarray:
    """A bf16 tensor's raw int16 words, as stream_in hands them to the store."""
    return t.view(torch.int16).numpy()


def header(rid: str, epoch: int, start: int, payload: np.ndarray, dtype: str = "") -> Header:
    return Header("kv", rid, epoch, 0, payload.shape[0], start, start + payload.shape[2],
                  dtype or payload.dtype.name, payload.shape, payload.nbytes)


def put(store: ReplicaStore, rid: str, epoch: int, start: int, payload: np.ndarray, dtype: str = "") -> None:
    store.put(header(rid, epoch, start, payload, dtype), payload.copy())


def fetch(store: ReplicaStore, rid: str, epoch: int, n: int, dtype: str = "float32") -> np.ndarray:
    """store.fetch's array, once its dtype name is checked."""
    array, name = store.fetch(rid, epoch, n)
    assert name == dtype
    return array


def cat(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate(parts, axis=2)  # the token axis


def gauge(name: str) -> float:
    return REGISTRY.get_sample_value(name)


# ReplicaStore, no transport.


def test_continuations_append_and_fetch_concatenates():
    store, a, b = ReplicaStore(), kv(4, 1), kv(3, 2)
    put(store, "r", 1, 0, a)
    put(store, "r", 1, 4, b)
    whole = fetch(store, "r", 1, 7)
    assert whole.shape == (LAYERS, 2, 7, HEADS, DIM) and whole.flags.c_contiguous
    np.testing.assert_array_equal(whole, cat(a, b))
    np.testing.assert_array_equal(fetch(store, "r", 1, 5), cat(a, b[:, :, :1]))
    assert fetch(store, "r", 1, 0).shape == (LAYERS, 2, 0, HEADS, DIM)
    assert store.bytes_held == 7 * TOKEN_BYTES == gauge("dejavu_cache_store_bytes_held")


def test_a_request_dropped_for_good_takes_no_new_replica_for_a_while():
    """The gateway's epoch-less drop (the request ended, its owner died): a put the dead owner had in
    flight lands after it and would leave a replica nobody drops; it is refused as fenced (so a live
    stale owner stops too) for ENDED_S. An owner's own drop (with its epoch) ends that epoch only: a
    token stage's put its head gave up waiting for is refused after it, a successor's is not."""
    from cache_store.store import ENDED_S

    store = ReplicaStore()
    put(store, "r", 0, 0, kv(4))
    assert store.drop("r") and "r" not in store.replicas
    with pytest.raises(StaleEpoch, match="^fenced: .*has ended"):
        put(store, "r", 0, 0, kv(6))  # the late put, from the start
    with pytest.raises(StaleEpoch):
        put(store, "r", 3, 0, kv(6))  # any epoch
    assert "r" not in store.replicas
    put(store, "s", 1, 0, kv(4))
    assert store.drop("s", epoch=1)  # its owner's cleanup
    with pytest.raises(StaleEpoch, match="^fenced: .*has ended"):
        put(store, "s", 1, 0, kv(4))  # a put of that owner still in flight
    put(store, "s", 2, 0, kv(4))  # a successor's
    assert store.replicas["s"].tokens == 4
    store.expire(now=time.monotonic() + ENDED_S + 1)
    put(store, "r", 0, 0, kv(2))  # forgotten after ENDED_S: the store's memory stays bounded
    assert store.replicas["r"].tokens == 2 and not store.ended


def test_new_owner_continues_from_a_trimmed_index_under_its_epoch():
    store, a, b, c = ReplicaStore(), kv(4, 1), kv(4, 2), kv(5, 3)
    put(store, "r", 1, 0, a)
    put(store, "r", 1, 4, b)
    put(store, "r", 2, 6, c)  # resumed at 6: [6, 8) of b is rewritten, b is sliced
    assert store.replicas["r"].epoch == 2 and store.replicas["r"].tokens == 11
    np.testing.assert_array_equal(fetch(store, "r", 2, 11), cat(a, b[:, :, :2], c))
    put(store, "r", 2, 2, c[:, :, :1].copy())  # cuts into the first chunk, drops the rest
    np.testing.assert_array_equal(fetch(store, "r", 2, 3), cat(a[:, :, :2], c[:, :, :1]))
    assert store.bytes_held == 3 * TOKEN_BYTES
    with pytest.raises(StaleEpoch):
        put(store, "r", 1, 3, kv(1))


def test_token_zero_starts_a_fresh_replica():
    store, a, b = ReplicaStore(), kv(8, 1), kv(2, 2)
    put(store, "r", 1, 0, a)
    put(store, "r", 1, 0, b)
    assert store.replicas["r"].tokens == 2 and store.bytes_held == 2 * TOKEN_BYTES
    np.testing.assert_array_equal(fetch(store, "r", 1, 2), b)
    with pytest.raises(ReplicaGap):
        store.fetch("r", 1, 3)


def put_layers(store: ReplicaStore, rid: str, epoch: int, layers: range, start: int, full: np.ndarray) -> None:
    """Tokens [start, ...) of `layers` of `full` (all layers, the tokens from 0): what one stage of a
    token pipeline sends."""
    part = full[layers.start: layers.stop, :, start:].copy()
    store.put(Header("kv", rid, epoch, layers.start, layers.stop, start, full.shape[2], "float32", part.shape,
                     part.nbytes), part)


@pytest.mark.parametrize("memory", ["memory", "spilled"])
def test_stages_replicate_their_own_layers_and_a_new_owner_goes_on_with_other_ranges(memory, tmp_path):
    """Issue #11 item 5: each stage of a token pipeline puts its own layer range, at its own pace;
    the store holds per layer the tokens it has, a fetch of all layers (or of some) is put together
    from the stages' chunks, and a new owner with other layer ranges (a pipeline of another depth)
    continues from its index: its puts cut and split the old chunks. Nothing is held twice, and a
    drop frees every byte, in memory and on disk."""
    store = ReplicaStore(memory_bytes=0 if memory == "spilled" else 2 << 30, spill_dir=str(tmp_path))
    full = kv(12, 1)
    put_layers(store, "r", 1, range(0, 2), 0, full[:, :, :4])  # stage 0 of 2: layers [0, 2)
    assert store.replicas["r"].ends == [4, 4]  # the store cannot know of layer 2: a restore asks for its layers
    with pytest.raises(ReplicaGap, match="4 tokens asked"):
        store.fetch("r", 1, 4, range(0, 3))
    np.testing.assert_array_equal(store.fetch("r", 1, 4, range(0, 2))[0], full[:2, :, :4])
    put_layers(store, "r", 1, range(2, 3), 0, full[:, :, :4])  # stage 1: layer 2
    put_layers(store, "r", 1, range(2, 3), 4, full[:, :, :8])  # stage 1 runs ahead
    with pytest.raises(ReplicaGap, match="gap"):
        put_layers(store, "r", 1, range(0, 2), 6, full[:, :, :8])  # stage 0 holds 4: [4, 6) would be missing
    assert store.replicas["r"].tokens == 4 and store.replicas["r"].ends == [4, 4, 8]
    np.testing.assert_array_equal(fetch(store, "r", 1, 4), full[:, :, :4])
    np.testing.assert_array_equal(store.fetch("r", 1, 8, range(2, 3))[0], full[2:, :, :8])
    put_layers(store, "r", 1, range(0, 2), 4, full[:, :, :8])
    np.testing.assert_array_equal(fetch(store, "r", 1, 8), full[:, :, :8])

    # a new owner of one stage resumed from 6 (its replicated index) and writes [6, ...) anew, its
    # KV recomputed: the old [6, 8) of every layer is cut, across both old chunks of tokens [4, 8)
    np.testing.assert_array_equal(fetch(store, "r", 2, 6), full[:, :, :6])
    new = cat(full[:, :, :6], kv(6, 2))
    put_layers(store, "r", 2, range(0, 3), 6, new[:, :, :10])
    assert store.replicas["r"].ends == [10, 10, 10]
    np.testing.assert_array_equal(fetch(store, "r", 2, 10), new[:, :, :10])
    # a third owner, of 3 stages, resumed from 9: layer 1's old chunks are split around it
    newer = cat(new[:, :, :9], kv(3, 3))
    put_layers(store, "r", 3, range(1, 2), 9, newer)
    assert store.replicas["r"].ends == [10, 12, 10] and store.replicas["r"].tokens == 10
    expect = new[:, :, :10].copy()
    expect[1, :, 9:] = newer[1, :, 9:10]
    np.testing.assert_array_equal(fetch(store, "r", 3, 10), expect)
    put_layers(store, "r", 3, range(0, 1), 9, newer)
    put_layers(store, "r", 3, range(2, 3), 9, newer)
    np.testing.assert_array_equal(fetch(store, "r", 3, 12), newer)
    held = sum(c.nbytes for c in store.replicas["r"].chunks)
    assert held == 12 * TOKEN_BYTES == store.bytes_held + store.bytes_spilled  # each token of each layer once
    with pytest.raises(StaleEpoch):
        put_layers(store, "r", 2, range(0, 1), 12, cat(newer, kv(1, 4)))  # the fenced owner of epoch 2

    put_layers(store, "r", 4, range(0, 1), 0, kv(2, 5))  # an owner at a newer epoch starting over: a fresh replica
    assert store.replicas["r"].ends == [2] and store.replicas["r"].tokens == 2
    assert store.drop("r") and store.bytes_held == store.bytes_spilled == 0
    assert spill_files(tmp_path) == []
    store.close()


def test_a_stage_starting_its_layers_over_keeps_the_other_stages_layers():
    """An owner whose replica starts over (a failed send) under the same epoch rewrites each
    stage's layers from 0; the other stage's layers stay until it does too. A put of every layer
    from 0 is a fresh replica (a single token service starting over)."""
    store, full = ReplicaStore(), kv(8, 1)
    put_layers(store, "r", 1, range(0, 1), 0, full[:, :, :8])
    put_layers(store, "r", 1, range(1, 3), 0, full[:, :, :8])
    put_layers(store, "r", 1, range(0, 1), 0, full[:, :, :2])
    assert store.replicas["r"].ends == [2, 8, 8]
    np.testing.assert_array_equal(fetch(store, "r", 1, 2), full[:, :, :2])
    put(store, "r", 1, 0, kv(3, 2))
    assert store.replicas["r"].ends == [3, 3, 3] and len(store.replicas["r"].chunks) == 1
    assert store.bytes_held == 3 * TOKEN_BYTES


def test_gaps_and_stale_epochs_are_refused():
    store = ReplicaStore()
    with pytest.raises(ReplicaGap, match="gap"):
        put(store, "r", 1, 4, kv(2))  # no replica yet
    assert "r" not in store.replicas
    put(store, "r", 2, 0, kv(4))
    with pytest.raises(ReplicaGap):
        put(store, "r", 2, 5, kv(2))
    with pytest.raises(StaleEpoch, match="fenced"):
        put(store, "r", 1, 0, kv(2))  # a fenced owner cannot restart it either
    with pytest.raises(StaleEpoch):
        put(store, "r", 1, 4, kv(2))
    assert store.replicas["r"].tokens == 4 and issubclass(StaleEpoch, Refused) and issubclass(ReplicaGap, Refused)


def test_chunks_that_do_not_fit_are_refused():
    store = ReplicaStore()
    put(store, "r", 1, 0, kv(4))
    with pytest.raises(BadChunk):
        put(store, "r", 1, 4, kv(2, heads=HEADS + 1))  # fetch could not concatenate it
    with pytest.raises(BadChunk):
        store.put(Header("kv", "r", 1, 0, LAYERS, 4, 7, "float32", (LAYERS, 2, 2, HEADS, DIM),
                         2 * TOKEN_BYTES), kv(2))  # header says 3 tokens, payload has 2
    with pytest.raises(BadChunk):
        store.put(header("r", 1, 4, kv(3)), kv(3).transpose(0, 1, 3, 2, 4).copy())  # the old, head-major layout
    assert store.replicas["r"].tokens == 4


OTHER_DTYPES = {  # a continuation of a bf16 replica in another dtype: (payload, wire dtype name)
    "float32": lambda: (kv(2), "float32"),
    "float16": lambda: (kv(2).astype(np.float16), "float16"),  # the same itemsize
    "int16": lambda: (words(bf16(2)), "int16"),  # the very same words, under another name
}


@pytest.mark.parametrize("other", OTHER_DTYPES)
def test_chunks_of_another_dtype_than_the_replicas_are_refused(other):
    store = ReplicaStore()
    put(store, "r", 1, 0, words(bf16(4, 1)), "bfloat16")
    payload, name = OTHER_DTYPES[other]()
    with pytest.raises(BadChunk, match="does not fit"):  # fetch could not answer in one dtype
        put(store, "r", 1, 4, payload, name)
    with pytest.raises(BadChunk, match="is not 'bfloat16'"):  # header and payload disagree
        put(store, "r", 1, 4, kv(2).astype(np.float16), "bfloat16")
    assert store.replicas["r"].tokens == 4 and store.replicas["r"].dtype == "bfloat16"
    put(store, "r", 1, 0, payload, name)  # a fresh replica may have another dtype
    assert store.replicas["r"].dtype == name
    np.testing.assert_array_equal(fetch(store, "r", 1, 2, dtype=name), payload)


def test_bfloat16_replica_is_kept_bit_exactly_through_spill_files(tmp_path):
    store = ReplicaStore(memory_bytes=TOKEN_BYTES, spill_dir=str(tmp_path))  # float32 bytes: 2 bf16 tokens
    a, b, c = bf16(4, 1), bf16(3, 2), bf16(1, 3)
    put(store, "r", 1, 0, words(a), "bfloat16")
    put(store, "r", 1, 4, words(b), "bfloat16")
    put(store, "r", 1, 7, words(c), "bfloat16")
    assert store.bytes_spilled == 7 * TOKEN_BYTES // 2 and store.bytes_held == TOKEN_BYTES // 2
    back = fetch(store, "r", 1, 8, dtype="bfloat16")
    assert back.dtype == np.int16  # the raw words, as they came
    np.testing.assert_array_equal(back, words(torch.cat([a, b, c], dim=2)))
    put(store, "r", 1, 5, words(c), "bfloat16")  # trims a spilled chunk: rewritten, same dtype
    np.testing.assert_array_equal(fetch(store, "r", 1, 6, dtype="bfloat16"),
                                  words(torch.cat([a, b[:, :, :1], c], dim=2)))
    store.close()


def test_fetch_under_a_newer_epoch_fences_the_old_owner():
    store, a = ReplicaStore(), kv(4, 1)
    put(store, "r", 1, 0, a)
    np.testing.assert_array_equal(fetch(store, "r", 3, 4), a)
    assert store.replicas["r"].epoch == 3
    with pytest.raises(StaleEpoch):
        put(store, "r", 1, 4, kv(1))
    with pytest.raises(StaleEpoch):
        store.fetch("r", 2, 4)
    with pytest.raises(ReplicaGap, match="5 tokens asked"):
        store.fetch("r", 3, 5)
    with pytest.raises(ReplicaGap, match="no replica"):
        store.fetch("other", 3, 1)
    put(store, "r", 3, 4, kv(1, 2))  # the new owner continues it
    assert store.replicas["r"].tokens == 5


def test_spills_oldest_chunks_past_the_budget_and_reads_them_back(tmp_path):
    store = ReplicaStore(memory_bytes=5 * TOKEN_BYTES, spill_dir=str(tmp_path / "spill"))
    sent = {rid: [kv(4, 10 * i), kv(3, 10 * i + 1)] for i, rid in enumerate(("a", "b", "c"))}
    for rid, (first, second) in sent.items():
        put(store, rid, 1, 0, first)
        put(store, rid, 1, 4, second)
    assert store.bytes_held == 3 * TOKEN_BYTES  # only c's newest chunk fits: older ones spill first
    assert store.bytes_spilled == 18 * TOKEN_BYTES
    assert gauge("dejavu_cache_store_bytes_held") == 3 * TOKEN_BYTES
    assert gauge("dejavu_cache_store_bytes_spilled") == 18 * TOKEN_BYTES
    assert gauge("dejavu_cache_store_replicas") == 3
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert len(files) == 5 and sum(os.path.getsize(f) for f in files) == 18 * TOKEN_BYTES
    for rid, parts in sent.items():
        np.testing.assert_array_equal(fetch(store, rid, 1, 7), cat(*parts))

    put(store, "a", 1, 2, kv(1, 99))  # trims a spilled chunk, deletes the other spilled one
    np.testing.assert_array_equal(fetch(store, "a", 1, 3), cat(sent["a"][0][:, :, :2], kv(1, 99)))
    assert store.bytes_held + store.bytes_spilled == 17 * TOKEN_BYTES
    for rid in sent:
        assert store.drop(rid)
    assert not store.drop("a")
    assert [f for _, _, fs in os.walk(tmp_path) for f in fs] == []
    assert (store.bytes_held, store.bytes_spilled) == (0, 0)
    assert gauge("dejavu_cache_store_bytes_spilled") == 0 and gauge("dejavu_cache_store_replicas") == 0
    store.close()
    assert os.listdir(tmp_path / "spill") == []  # the private folder is gone


def test_default_spill_folder_is_temporary():
    store = ReplicaStore(memory_bytes=0)
    put(store, "r", 1, 0, kv(2, 5))
    assert store.bytes_held == 0 and os.path.isdir(store.folder)
    folder = store.folder
    np.testing.assert_array_equal(fetch(store, "r", 1, 2), kv(2, 5))
    store.close()
    assert not os.path.exists(folder)


@contextlib.contextmanager
def disk_full_past(nbytes: int):
    """Real write failures: files of this process cannot grow past `nbytes` (RLIMIT_FSIZE; the
    kernel answers EFBIG, as a full disk answers ENOSPC, after writing what fits)."""
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def spill_files(folder) -> list[str]:
    return sorted(f for _, _, fs in os.walk(folder) for f in fs)


def test_memory_is_a_hard_cap_when_the_disk_is_full(tmp_path):
    """Issue #10 item 14: before, a failed spill kept everything in memory, without bound, and left
    a partial file. Now a put that does not fit is refused (the owner replicates elsewhere) and
    leaves the replica as it was; the store takes puts again once the disk has room."""
    store = ReplicaStore(memory_bytes=4 * TOKEN_BYTES, spill_dir=str(tmp_path))
    put(store, "a", 1, 0, kv(3, 1))
    with disk_full_past(TOKEN_BYTES):  # a 3-token chunk cannot be written whole
        put(store, "b", 1, 0, kv(1, 2))  # fits in memory: no spill needed
        with pytest.raises(StoreFull, match="--memory-bytes"):
            put(store, "b", 1, 1, kv(2, 3))  # needs a spill, which fails
        with pytest.raises(StoreFull):
            put(store, "c", 1, 0, kv(5, 4))  # past the cap on its own: straight to disk, which fails
        assert store.bytes_held == 4 * TOKEN_BYTES and store.bytes_spilled == 0
        assert spill_files(tmp_path) == [], "a failed spill left a partial file"
        assert store.replicas["b"].tokens == 1 and "c" not in store.replicas
        np.testing.assert_array_equal(fetch(store, "a", 1, 3), kv(3, 1))
    put(store, "b", 1, 1, kv(2, 3))  # room on disk again
    np.testing.assert_array_equal(fetch(store, "b", 1, 3), cat(kv(1, 2), kv(2, 3)))
    assert store.bytes_held <= 4 * TOKEN_BYTES and store.bytes_spilled == 3 * TOKEN_BYTES
    store.close()


def test_a_spilled_chunk_that_cannot_be_rewritten_goes_back_to_memory(tmp_path):
    store = ReplicaStore(memory_bytes=0, spill_dir=str(tmp_path))
    put(store, "a", 1, 0, kv(4, 1))
    assert store.bytes_spilled == 4 * TOKEN_BYTES
    with disk_full_past(TOKEN_BYTES):
        with pytest.raises(StoreFull):
            put(store, "a", 2, 2, kv(2, 2))  # no room for the new chunk: nothing changes
        assert store.replicas["a"].tokens == 4
        store._cut(store.replicas["a"], range(LAYERS), 2)  # a trim whose rewrite fails keeps the kept tokens in memory
    np.testing.assert_array_equal(fetch(store, "a", 1, 2), kv(4, 1)[:, :, :2])
    assert (store.bytes_held, store.bytes_spilled) == (2 * TOKEN_BYTES, 0)
    assert spill_files(tmp_path) == []
    store.close()


def test_a_cut_that_finds_no_room_for_a_split_leaves_the_replica_as_it_was(tmp_path):
    """A new owner of one layer continues from its index: the old chunk of every layer is split (its
    other layers kept whole, in new chunks). When the disk is full and a piece finds no room, the put
    is refused and the replica is exactly as it was: the other layers are not lost (before, the
    store dropped the whole replica) and no byte is counted twice. The pieces are copies: the old
    chunk's array is not pinned by them."""
    full = kv(8, 1)
    layer = TOKEN_BYTES // LAYERS
    store = ReplicaStore(memory_bytes=8 * TOKEN_BYTES + 2 * layer, spill_dir=str(tmp_path))
    put(store, "r", 1, 0, full)
    before = [(c.layer, c.start, c.shape) for c in store.replicas["r"].chunks]
    with disk_full_past(layer):
        with pytest.raises(StoreFull):
            put_layers(store, "r", 2, range(1, 2), 6, cat(full[:, :, :6], kv(2, 2)))
        assert [(c.layer, c.start, c.shape) for c in store.replicas["r"].chunks] == before
        assert store.replicas["r"].ends == [8, 8, 8] and store.replicas["r"].epoch == 1
        assert (store.bytes_held, store.bytes_spilled) == (8 * TOKEN_BYTES, 0)
        assert spill_files(tmp_path) == []
    np.testing.assert_array_equal(fetch(store, "r", 1, 8), full)
    newer = cat(full[:, :, :6], kv(2, 2))
    put_layers(store, "r", 2, range(1, 2), 6, newer)  # room again
    expect = full.copy()
    expect[1, :, 6:] = newer[1, :, 6:]
    np.testing.assert_array_equal(fetch(store, "r", 2, 8), expect)
    assert all(c.data is None or c.data.base is None for c in store.replicas["r"].chunks)
    assert store.bytes_held + store.bytes_spilled == 8 * TOKEN_BYTES
    assert store.drop("r") and store.bytes_held == store.bytes_spilled == 0 and spill_files(tmp_path) == []
    store.close()


def test_layer_ranges_that_are_not_a_models_are_refused():
    """An empty or absurd layer range (a hostile or broken peer) is a BadChunk, not a replica whose
    per-layer index grows to the range's end."""
    store = ReplicaStore()
    empty = np.zeros((0, 2, 2, HEADS, DIM), np.float32)
    for start, end in ((5, 5), (10**9, 10**9), (0, 10**9)):
        with pytest.raises(BadChunk, match="not a range of a model"):
            store.put(Header("kv", "r", 1, start, end, 0, 2, "float32", empty.shape, 0), empty)
    assert "r" not in store.replicas
    put(store, "r", 1, 0, kv(2, 1))  # a replica of layers [0, 3), then a continuation reaching a billion layers
    with pytest.raises(BadChunk, match="not a range of a model"):
        store.put(Header("kv", "r", 1, 0, 10**9, 2, 3, "float32", empty.shape, 0), empty)
    for layers, n in ((range(0, 10**9), 0), (range(-1, 2), 2), (range(2, 2), 2)):
        with pytest.raises(ReplicaGap, match="not a range of a model"):
            store.fetch("r", 1, n, layers=layers)
    with pytest.raises(ReplicaGap, match="2 tokens asked of layers \\[0, 4\\), the store holds 0 of layer 3"):
        store.fetch("r", 1, 2, layers=range(0, 4))
    assert store.fetch("r", 1, 2, layers=range(1, 2))[0].shape == (1, 2, 2, HEADS, DIM)


def test_a_put_that_fails_while_trimming_leaves_nothing_behind(tmp_path):
    """A continuation trims a spilled chunk, which reads its file back; if that fails (a damaged
    file), the new chunk placed for the put is freed again: no bytes counted, no file left."""
    store = ReplicaStore(memory_bytes=0, spill_dir=str(tmp_path))
    put(store, "a", 1, 0, kv(4, 1))
    (path,) = [os.path.join(tmp_path, d, f) for d in os.listdir(tmp_path) for f in os.listdir(tmp_path / d)]
    with open(path, "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(ValueError):
        put(store, "a", 1, 2, kv(2, 2))
    assert store.bytes_spilled == 4 * TOKEN_BYTES and store.bytes_held == 0  # as before the put
    assert store.drop("a") and store.bytes_spilled == 0 and spill_files(tmp_path) == []
    store.close()


def test_replicas_left_alone_past_the_ttl_expire(tmp_path):
    """A replica whose owner and gateway died together is dropped after the TTL; one its owner
    keeps writing (or a successor fetched) stays."""
    store = ReplicaStore(memory_bytes=TOKEN_BYTES, spill_dir=str(tmp_path), ttl_s=60)
    put(store, "orphan", 1, 0, kv(3, 1))
    put(store, "live", 1, 0, kv(3, 2))
    put(store, "fetched", 1, 0, kv(3, 3))
    now = time.monotonic()
    store.replicas["orphan"].renewed = store.replicas["live"].renewed = store.replicas["fetched"].renewed = now - 50
    put(store, "live", 1, 3, kv(1, 4))  # its owner writes on: renewed
    fetch(store, "fetched", 2, 3)       # a successor fetched it: renewed
    assert store.expire(now + 20) == ["orphan"]
    assert sorted(store.replicas) == ["fetched", "live"]
    assert store.bytes_held + store.bytes_spilled == 7 * TOKEN_BYTES
    assert spill_files(tmp_path) == ["2.kv", "3.kv"]  # the orphan's file is gone; live's new chunk is in memory
    assert store.expire(now + 200) == ["live", "fetched"] and spill_files(tmp_path) == []
    store.close()


# End to end: PeerLink sends, kv_server stores, fetch_replica reads back.


@pytest.fixture(params=TRANSPORTS)
def name(request) -> str:
    return request.param


@pytest_asyncio.fixture
async def served(name, tmp_path):
    """(store, its KV address, client transport); the store spills past two tokens."""
    store = ReplicaStore(memory_bytes=2 * TOKEN_BYTES, spill_dir=str(tmp_path))
    server, client = make_transport(name), make_transport(name)
    handler = kv_server(store.put, (Refused,), fetch=lambda h: store.fetch(h.request_id, h.epoch, h.token_end))
    # fetch -> (raw array, dtype name): what cache_store/app.py wires
    try:
        address = await server.listen(handler, "127.0.0.1")
        yield store, address, client
    finally:
        await client.close()
        await server.close()
        store.close()


async def send(link, rid: str, epoch: int, start: int, payload: np.ndarray | torch.Tensor) -> Header:
    ack = await link.send(payload, request_id=rid, epoch=epoch, layer_start=0, layer_end=LAYERS,
                          token_start=start, token_end=start + payload.shape[2])
    return await asyncio.wait_for(ack, BOUND_S)


@pytest.mark.asyncio
async def test_replica_round_trips_over_the_transport(served):
    store, address, client = served
    peers = Peers(client)
    try:
        link = await peers.get(address)
        a, b, c = kv(5, 1), kv(3, 2), kv(2, 3)
        assert (await send(link, "r", 1, 0, a)).kind == "ack"
        await send(link, "r", 1, 5, b)
        assert store.bytes_spilled > 0  # the fetch below reads spill files too
        back = await fetch_replica(client, address, "r", 1, 8, timeout=BOUND_S)
        assert back.dtype == torch.float32 and back.shape == (LAYERS, 2, 8, HEADS, DIM)
        np.testing.assert_array_equal(back.numpy(), cat(a, b))

        back = await fetch_replica(client, address, "r", 2, 6, timeout=BOUND_S)  # the new owner
        np.testing.assert_array_equal(back.numpy(), cat(a, b[:, :, :1]))
        with pytest.raises(KVRejected, match="fenced"):
            await send(link, "r", 1, 8, c)  # the old owner is fenced by that fetch
        await send(link, "r", 2, 6, c)
        back = await fetch_replica(client, address, "r", 2, 8, timeout=BOUND_S)
        np.testing.assert_array_equal(back.numpy(), cat(a, b[:, :, :1], c))

        with pytest.raises(FetchError, match="9 tokens asked"):
            await fetch_replica(client, address, "r", 2, 9, timeout=BOUND_S)
        with pytest.raises(FetchError, match="fenced"):
            await fetch_replica(client, address, "r", 1, 2, timeout=BOUND_S)
        with pytest.raises(KVRejected, match="gap"):
            await send(link, "r", 2, 9, c)
        await send(link, "r", 2, 8, c)  # the link survived the refusals
        assert store.replicas["r"].tokens == 10
    finally:
        await peers.close()


@pytest.mark.asyncio
async def test_bfloat16_replica_round_trips_over_the_transport(served):
    store, address, client = served
    peers = Peers(client)
    try:  # bf16 tensors go out as they are, are held (and spilled) as words, come back as bf16
        link = await peers.get(address)
        a, b = bf16(5, 1), bf16(3, 2)
        await send(link, "r", 1, 0, a)
        await send(link, "r", 1, 5, b)
        assert store.bytes_spilled > 0 and store.replicas["r"].dtype == "bfloat16"
        back = await fetch_replica(client, address, "r", 1, 8, timeout=BOUND_S)
        assert back.dtype == torch.bfloat16 and back.shape == (LAYERS, 2, 8, HEADS, DIM)
        assert torch.equal(back.view(torch.int16), torch.cat([a, b], dim=2).view(torch.int16))  # bit-exact
        with pytest.raises(KVRejected, match="does not fit"):
            await send(link, "r", 1, 8, torch.from_numpy(kv(1)))  # float32 after bf16
        back = await fetch_replica(client, address, "r", 1, 6, timeout=BOUND_S)
        assert torch.equal(back.view(torch.int16), torch.cat([a, b[:, :, :1]], dim=2).view(torch.int16))
    finally:
        await peers.close()


@pytest.mark.asyncio
async def test_server_answers_unexpected_kinds_with_errors(name):
    server, client = make_transport(name), make_transport(name)
    try:  # a receiver that serves no fetches (a token service's)
        address = await server.listen(kv_server(lambda h, p: None, (Refused,)), "127.0.0.1")
        conn = await asyncio.wait_for(client.connect(address), BOUND_S)
        await send_fetch(conn, "r", 1, 4)
        reply, _ = await asyncio.wait_for(stream_in(conn), BOUND_S)
        assert (reply.kind, reply.request_id, reply.token_end) == ("error", "r", 4)
        assert "'fetch'" in reply.message
        await conn.send(Header("ack", "r", 1).encode())
        reply, _ = await asyncio.wait_for(stream_in(conn), BOUND_S)
        assert reply.kind == "error" and "'ack'" in reply.message
        with pytest.raises(FetchError, match="no 'fetch' messages"):
            await fetch_replica(client, address, "r", 1, 4, timeout=BOUND_S)
    finally:
        await client.close()
        await server.close()
