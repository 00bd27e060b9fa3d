"""Replicas in host memory, per request: chunks of (layers, 2, kv_heads, tokens, head_dim).

A request's replica is the chunks received for it under its newest epoch; a chunk from an older
epoch (a fenced owner) is refused. Spilling past the memory budget and serving fetches come
with recovery (issue #3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Gauge

from common.kv.wire import Header

BYTES_HELD = Gauge("dejavu_cache_store_bytes_held", "replica bytes in host memory")
REPLICAS = Gauge("dejavu_cache_store_replicas", "requests with a replica")


class StaleEpoch(Exception):
    pass


@dataclass
class Replica:
    epoch: int
    chunks: list[tuple[Header, np.ndarray]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for _, a in self.chunks)

    @property
    def tokens(self) -> int:
        """Tokens [0, n) held for every layer (chunks are appended in token order)."""
        return max((h.token_end for h, _ in self.chunks), default=0)


class ReplicaStore:
    def __init__(self) -> None:
        self.replicas: dict[str, Replica] = {}

    def put(self, header: Header, payload: np.ndarray) -> None:
        replica = self.replicas.get(header.request_id)
        if replica is not None and header.epoch < replica.epoch:
            raise StaleEpoch(f"request {header.request_id}: epoch {header.epoch} is fenced (now {replica.epoch})")
        if replica is None or header.epoch > replica.epoch or header.token_start == 0:  # a new (or restarted) replica
            replica = self.replicas[header.request_id] = Replica(header.epoch)
        replica.chunks.append((header, payload.copy()))
        self._gauges()

    def drop(self, request_id: str) -> bool:
        found = self.replicas.pop(request_id, None) is not None
        self._gauges()
        return found

    @property
    def bytes_held(self) -> int:
        return sum(r.nbytes for r in self.replicas.values())

    def _gauges(self) -> None:
        BYTES_HELD.set(self.bytes_held)
        REPLICAS.set(len(self.replicas))
