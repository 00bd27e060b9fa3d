"""Replicas of requests' KV: chunks of (layers, 2, tokens, kv_heads, head_dim), each a rectangle of
a layer range by a token range, that cover tokens [0, n_l) of each layer l of a request
contiguously, under the epoch of the owner that wrote them. A token service sends every layer in
one chunk; each stage of a token pipeline sends its own layers' (token_service/stage.py), so one
replica may hold chunks of several layer ranges, and a new owner of another pipeline depth goes on
with its own ranges. A chunk is held as it arrived: raw numpy words plus the wire dtype name (e.g.
int16 words of "bfloat16"); the store never needs the values, and a fetch answers with the same
dtype name.

A replica's lifecycle:
1. put at token_start 0 under a newer epoch, of every layer the replica has, or of a request with
   no replica: a fresh replica at the message's epoch (an older one is freed);
2. put of layers [a, b) at token_start t: every layer in [a, b) must hold [0, t) already (0 asks
   nothing). Tokens at or past t of those layers are cut first, so a new owner that resumed from
   index k rewrites [k, ...) under its newer epoch, and an owner that starts its replica over
   rewrites it from 0;
3. fetch(epoch, n, layers): tokens [0, n) of those layers (all by default) as one array, and their
   dtype name. A newer epoch fences the old owner here too;
4. drop: the request ended; its memory and spill files are freed;
   or expiry: a replica nobody wrote to or fetched for `ttl_s` is dropped (its owner writes every
   few tokens while the request runs: one left alone lost its owner and its gateway together).

Past `memory_bytes`, the oldest chunks (by arrival, across replicas) are written to files and
read back by fetch. Spill files are worth nothing once this process is gone (no other store can
serve them), so they live in a private folder that close() removes. `memory_bytes` caps the
replicas held in memory (a message being received is in memory until put): when the disk takes no
more (full, unwritable), a put that does not fit is refused (StoreFull; the owner replicates to
another store) and no partial file is left behind.

    Refused          the store will not do it; the sender gets an error frame
    ├── StaleEpoch   the sender's epoch is older than the replica's (a fenced owner)
    ├── ReplicaGap   a put that would leave tokens missing, or a fetch of tokens not held
    ├── BadChunk     a payload whose shape or dtype does not fit its header or the replica
    └── StoreFull    memory is at --memory-bytes and spilling to disk fails
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Gauge

from common.kv.wire import FENCED, Header, numpy_dtype

log = logging.getLogger(__name__)

BYTES_HELD = Gauge("dejavu_cache_store_bytes_held", "replica bytes in host memory")
BYTES_SPILLED = Gauge("dejavu_cache_store_bytes_spilled", "replica bytes spilled to disk")
REPLICAS = Gauge("dejavu_cache_store_replicas", "requests with a replica")


class Refused(Exception):
    """The store refuses a put or fetch; the message says why."""


class StaleEpoch(Refused):
    pass


class ReplicaGap(Refused):
    pass


class BadChunk(Refused):
    pass


class StoreFull(Refused):
    pass


@dataclass(eq=False)  # identity-hashed: the memory queue is keyed by chunk
class Chunk:
    """Tokens [start, end) of layers [layer, layer + shape[0]) of a replica, in memory (`data`) or
    spilled to the file `path`."""

    start: int
    data: np.ndarray | None  # (layers, 2, end - start, kv_heads, head_dim), C-contiguous raw words
    dtype: str  # wire dtype name: numpy's dtype of `data` cannot tell "bfloat16" from "int16"
    shape: tuple[int, ...]
    path: str = ""  # the spill file: the raw bytes, nothing else
    layer: int = 0  # the first layer

    @property
    def end(self) -> int:
        return self.start + self.shape[2]

    @property
    def layers(self) -> range:
        return range(self.layer, self.layer + self.shape[0])

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * numpy_dtype(self.dtype).itemsize

    def array(self) -> np.ndarray:
        if self.data is not None:
            return self.data
        return np.fromfile(self.path, dtype=numpy_dtype(self.dtype)).reshape(self.shape)


@dataclass(eq=False)
class Replica:
    epoch: int
    chunks: list[Chunk] = field(default_factory=list)  # in no particular order; per layer they tile [0, ends[l])
    ends: list[int] = field(default_factory=list)  # per layer l: tokens [0, ends[l]) are held
    renewed: float = field(default_factory=time.monotonic)  # last put or fetch: expiry counts from here

    @property
    def tokens(self) -> int:
        """Tokens [0, n) held of every layer any chunk has."""
        return min(self.ends, default=0)

    def held(self, layer: int) -> int:
        return self.ends[layer] if layer < len(self.ends) else 0

    @property
    def dtype(self) -> str:
        """The wire dtype name of every chunk (put refuses a chunk of another)."""
        return self.chunks[0].dtype


MAX_LAYERS = 1024  # a replica's layer indices are below this (the largest models have ~130 layers)
ENDED_S = 60.0  # how long a request that ended for good refuses a new replica (see ReplicaStore.drop)


class ReplicaStore:
    def __init__(self, memory_bytes: int = 2 << 30, spill_dir: str = "", ttl_s: float = 600.0) -> None:
        self.memory_bytes, self.spill_dir, self.ttl_s = memory_bytes, spill_dir, ttl_s
        self.replicas: dict[str, Replica] = {}
        self.ended: dict[str, tuple[int, float]] = {}  # request id -> (epoch dropped up to, when; see drop)
        self.resident: dict[Chunk, None] = {}  # chunks in memory, oldest first: the spill order
        self.bytes_held = 0  # in memory
        self.bytes_spilled = 0  # on disk
        self.folder: str | None = None  # made at the first spill
        self.spills = 0

    def put(self, header: Header, payload: np.ndarray) -> None:
        """Store one "kv" message; takes ownership of `payload` (stream_in's buffer is fresh)."""
        rid, start, layers = header.request_id, header.token_start, range(header.layer_start, header.layer_end)
        _check_ranges(header)  # first: the gap check below walks the layers
        replica = self.replicas.get(rid)
        if replica is not None and header.epoch < replica.epoch:
            raise StaleEpoch(f"{FENCED}request {rid}: epoch {header.epoch} is older than the replica's {replica.epoch}")
        if replica is None and header.epoch <= self.ended.get(rid, (-1, 0.0))[0]:
            raise StaleEpoch(f"{FENCED}request {rid} has ended (epoch {header.epoch}): no new replica of it is taken")
        fresh = start == 0 and (replica is None or header.epoch > replica.epoch  # a new owner's, or every layer
                                or (layers.start == 0 and layers.stop >= len(replica.ends)))  # written anew
        if not fresh and (short := next((l for l in layers if replica is None or replica.held(l) < start), None)) \
                is not None:
            raise ReplicaGap(f"request {rid}: tokens from {start} of layers [{layers.start}, {layers.stop}) would "
                             f"leave a gap (the store holds {replica.held(short) if replica else 0} of layer "
                             f"{short})")
        _check_payload(header, payload, None if fresh else replica.chunks[0])
        chunk = self._place(Chunk(start, np.ascontiguousarray(payload), header.dtype, tuple(payload.shape),
                                  layer=layers.start))
        try:  # nothing changed before this point: a refused put leaves the replica as it was
            if fresh:
                if replica is not None:
                    self._free_all(replica)
                replica = self.replicas[rid] = Replica(header.epoch)
            else:
                self._cut(replica, layers, start)  # reads spill files back: may fail
                replica.epoch = max(replica.epoch, header.epoch)
                replica.renewed = time.monotonic()
        except BaseException:  # the cut is all or nothing: the replica is as it was
            self._free(chunk)
            raise
        finally:
            self._gauges()
        replica.chunks.append(chunk)
        replica.ends.extend([0] * (layers.stop - len(replica.ends)))
        for layer in layers:
            replica.ends[layer] = chunk.end

    def fetch(self, request_id: str, epoch: int, n: int, layers: range | None = None) -> tuple[np.ndarray, str]:
        """(tokens [0, n) of `layers` of the replica (all it has by default), their wire dtype name):
        a fresh C-contiguous array of (layers, 2, n, kv_heads, head_dim), raw words as put (int16
        for "bfloat16"). A newer epoch becomes the replica's, so the fenced owner's puts are refused."""
        replica = self.replicas.get(request_id)
        if replica is None:
            raise ReplicaGap(f"request {request_id}: no replica")
        if epoch < replica.epoch:
            raise StaleEpoch(f"{FENCED}request {request_id}: epoch {epoch} is older than the replica's {replica.epoch}")
        layers = range(len(replica.ends)) if layers is None else layers
        if not layers or layers.start < 0 or layers.stop > MAX_LAYERS:
            raise ReplicaGap(f"request {request_id}: layers [{layers.start}, {layers.stop}) asked: not a range of a "
                             f"model (at most {MAX_LAYERS} layers)")
        if (short := next((l for l in layers if replica.held(l) < n), None)) is not None:
            raise ReplicaGap(f"request {request_id}: {n} tokens asked of layers [{layers.start}, {layers.stop}), "
                             f"the store holds {replica.held(short)} of layer {short}")
        replica.epoch, replica.renewed = epoch, time.monotonic()
        like = replica.chunks[0]
        out = np.empty((len(layers), 2, n) + like.shape[3:], dtype=numpy_dtype(like.dtype))
        for c in replica.chunks:
            lo, hi, stop = max(layers.start, c.layer), min(layers.stop, c.layers.stop), min(c.end, n)
            if lo < hi and c.start < stop:
                out[lo - layers.start: hi - layers.start, :, c.start: stop] = \
                    c.array()[lo - c.layer: hi - c.layer, :, : stop - c.start]
        return out, like.dtype

    def drop(self, request_id: str, epoch: int | None = None) -> bool:
        """Free a replica; with `epoch`, only if it is not newer (a fenced owner's cleanup must not
        drop its successor's replica). Returns whether one was dropped. For ENDED_S afterwards no
        new replica of the request is taken at that epoch or older (at any epoch after a drop
        without one: the gateway's, once a request whose owner died has ended), so a put still in
        flight (a dead owner's, seen in CI: tests/cluster/test_chaos.py; a token stage's, whose
        head gave up waiting for it) cannot land after the drop and leave a replica nobody drops."""
        upto = sys.maxsize if epoch is None else epoch
        self.ended[request_id] = (max(upto, self.ended.get(request_id, (-1, 0.0))[0]), time.monotonic())
        replica = self.replicas.get(request_id)
        if replica is None or (epoch is not None and replica.epoch > epoch):
            return False
        del self.replicas[request_id]
        self._free_all(replica)
        self._gauges()
        return True

    def expire(self, now: float | None = None) -> list[str]:
        """Drop the replicas nobody wrote to or fetched for `ttl_s`; returns their request ids."""
        now = time.monotonic() if now is None else now
        self.ended = {rid: (upto, at) for rid, (upto, at) in self.ended.items() if now - at <= ENDED_S}
        old = [rid for rid, r in self.replicas.items() if now - r.renewed > self.ttl_s]
        for rid in old:
            self.drop(rid)
        return old

    def close(self) -> None:
        """Remove the spill folder; the store holds nothing on disk afterwards."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def _free_all(self, replica: Replica) -> None:
        for chunk in replica.chunks:
            self._free(chunk)
        replica.chunks, replica.ends = [], []

    def _cut(self, replica: Replica, layers: range, at: int) -> None:
        """Free tokens [at, ...) of `layers`. A chunk that straddles `at` keeps [start, at); one that
        also has layers outside `layers` (written by a pipeline of another depth) is split, its
        other layers kept whole. All or nothing: every array is read (spill files) and every piece
        placed before a chunk is freed or trimmed, so StoreFull, or an error reading a spill file
        back, leaves the replica as it was."""
        kept, freed, trims, pieces = [], [], [], []
        try:
            for chunk in replica.chunks:
                lo, hi = max(layers.start, chunk.layer), min(layers.stop, chunk.layers.stop)
                if lo >= hi or chunk.end <= at:
                    kept.append(chunk)
                elif (lo, hi) == (chunk.layer, chunk.layers.stop):
                    if chunk.start < at:
                        trims.append((chunk, chunk.array()[:, :, : at - chunk.start].copy()))
                        kept.append(chunk)
                    else:
                        freed.append(chunk)
                else:
                    array, first = chunk.array(), chunk.layer
                    for layer, part in ((first, array[: lo - first]), (hi, array[hi - first:]),  # other layers whole
                                        (lo, array[lo - first: hi - first, :, : max(at - chunk.start, 0)])):  # to `at`
                        if part.shape[0] and part.shape[2]:  # a copy: a view would pin the whole old array
                            pieces.append(self._place(Chunk(chunk.start, part.copy(), chunk.dtype, part.shape,
                                                            layer=layer)))
                    freed.append(chunk)
        except BaseException:
            for piece in pieces:
                self._free(piece)
            raise
        for chunk in freed:
            self._free(chunk)
        for chunk, part in trims:
            self._trim(chunk, part)
        replica.chunks = kept + pieces
        for layer in layers:
            if layer < len(replica.ends):
                replica.ends[layer] = min(replica.ends[layer], at)

    def _trim(self, chunk: Chunk, kept: np.ndarray) -> None:
        """`chunk` becomes `kept` (a copy of its first tokens, read before: frees the rest)."""
        if chunk.data is not None:
            self.bytes_held -= chunk.nbytes - kept.nbytes
            chunk.data, chunk.shape = kept, kept.shape
            return
        try:
            self._write(kept, chunk.path)
            self.bytes_spilled -= chunk.nbytes - kept.nbytes
        except OSError as exc:  # the disk takes no more: the kept tokens go back to memory (a new chunk waits)
            log.warning("cannot rewrite a spilled chunk (%s): keeping its %d B in memory", exc, kept.nbytes)
            self._remove(chunk.path)
            self.bytes_spilled -= chunk.nbytes
            self.bytes_held += kept.nbytes
            chunk.data, chunk.path = kept, ""
            self.resident[chunk] = None
        chunk.shape = kept.shape

    def _free(self, chunk: Chunk) -> None:
        if chunk.data is None:
            self._remove(chunk.path)
            self.bytes_spilled -= chunk.nbytes
        else:
            del self.resident[chunk]
            self.bytes_held -= chunk.nbytes

    def _place(self, chunk: Chunk) -> Chunk:
        """Room for a new chunk: in memory, spilling the oldest chunks past `memory_bytes`, or
        straight to disk when it alone is past it. StoreFull if the disk takes no more."""
        try:
            while self.bytes_held + chunk.nbytes > self.memory_bytes and self.resident:
                self._spill(next(iter(self.resident)))
            if self.bytes_held + chunk.nbytes > self.memory_bytes:
                path = self._spill_path()
                self._write(chunk.data, path)
                chunk.path, chunk.data = path, None
                self.bytes_spilled += chunk.nbytes
                return chunk
        except OSError as exc:
            raise StoreFull(f"the cache store is full: {self.bytes_held} B in memory (--memory-bytes "
                            f"{self.memory_bytes}) and spilling to {self.folder or self.spill_dir or 'disk'} "
                            f"failed: {exc}") from exc
        self.resident[chunk] = None
        self.bytes_held += chunk.nbytes
        return chunk

    def _spill(self, chunk: Chunk) -> None:
        path = self._spill_path()
        self._write(chunk.data, path)  # synchronous: a chunk is one replication step's KV
        del self.resident[chunk]
        chunk.path, chunk.data = path, None
        self.bytes_held -= chunk.nbytes
        self.bytes_spilled += chunk.nbytes
        log.debug("spilled %d B to %s (%d B left in memory)", chunk.nbytes, path, self.bytes_held)

    @staticmethod
    def _write(array: np.ndarray, path: str) -> None:
        """`array`'s bytes to `path`, whole or not at all: a failed write leaves no partial file."""
        part = path + ".part"
        try:  # not ndarray.tofile: it does not report a short write (a full disk), which would corrupt the replica
            with open(part, "wb") as f:
                f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
            os.replace(part, path)
        except OSError:
            ReplicaStore._remove(part)
            raise

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # the folder goes at close() in any case
            log.warning("cannot remove spill file %s: %s", path, exc)

    def _spill_path(self) -> str:
        if self.folder is None:
            if self.spill_dir:
                os.makedirs(self.spill_dir, exist_ok=True)
            self.folder = tempfile.mkdtemp(prefix="dejavu-replicas-", dir=self.spill_dir or None)
        self.spills += 1
        return os.path.join(self.folder, f"{self.spills}.kv")

    def _gauges(self) -> None:
        BYTES_HELD.set(self.bytes_held)
        BYTES_SPILLED.set(self.bytes_spilled)
        REPLICAS.set(len(self.replicas))


def _check_ranges(header: Header) -> None:
    if not 0 <= header.layer_start < header.layer_end <= MAX_LAYERS or header.token_end <= header.token_start:
        raise BadChunk(f"request {header.request_id}: layers [{header.layer_start}, {header.layer_end}) and tokens "
                       f"[{header.token_start}, {header.token_end}) are not a range of a model (at most {MAX_LAYERS} "
                       f"layers)")


def _check_payload(header: Header, payload: np.ndarray, like: Chunk | None) -> None:
    """The payload must be (layers, 2, tokens, kv_heads, head_dim) of the header's layers, tokens
    and dtype, and match the replica's other chunks: fetch puts them together."""
    tokens, layers = header.token_end - header.token_start, header.layer_end - header.layer_start
    if payload.ndim != 5 or payload.shape[:3] != (layers, 2, tokens):
        raise BadChunk(f"request {header.request_id}: payload {payload.shape} is not layers [{header.layer_start}, "
                       f"{header.layer_end}) ({layers}, 2, {tokens}, kv_heads, head_dim)")
    if payload.dtype != numpy_dtype(header.dtype):
        raise BadChunk(f"request {header.request_id}: a {payload.dtype} payload is not {header.dtype!r}")
    if like is not None and (header.dtype != like.dtype or _dims(payload.shape) != _dims(like.shape)):
        raise BadChunk(f"request {header.request_id}: payload {header.dtype}{payload.shape} does not fit "
                       f"the replica's {like.dtype}{like.shape}")


def _dims(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(2, kv_heads, head_dim): all but the layer and token axes."""
    return shape[1:2] + shape[3:]
