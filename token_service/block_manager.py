"""KV room: the pool has `slots` rows of `max_len` tokens; a sequence owns one row from
reservation until it ends. Lowest free row first, so running rows stay packed at the front
of the pool and a decode step's batch (rows [0, highest running + 1)) wastes little."""

from __future__ import annotations

import heapq


class SlotManager:
    def __init__(self, slots: int, max_len: int):
        self.slots, self.max_len = slots, max_len
        self.free_slots = list(range(slots))  # a heap

    @property
    def num_free(self) -> int:
        return len(self.free_slots)

    @property
    def num_used(self) -> int:
        return self.slots - self.num_free

    def can_allocate(self, tokens: int) -> bool:
        return self.num_free > 0 and tokens <= self.max_len

    def allocate(self) -> int:
        return heapq.heappop(self.free_slots)

    def free(self, slot: int) -> None:
        if slot in self.free_slots:
            raise RuntimeError(f"slot {slot} freed twice")
        heapq.heappush(self.free_slots, slot)
