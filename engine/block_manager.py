"""Paged KV room: the pool is `num_blocks` blocks of `block_size` tokens; a sequence holds a block
table that grows as it decodes, so it holds memory in proportion to the tokens it has.

Admission is by commitment: a sequence is admitted only if the blocks its longest possible length
(prompt + max_tokens) needs are not promised to others, so a running sequence never finds the pool
empty (no preemption needed); blocks are taken from the free list only as tokens arrive. Lowest
free block first, which keeps the pool's hot part small.
"""

from __future__ import annotations

import heapq


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks = list(range(num_blocks))  # a heap
        self.committed = 0  # blocks promised to admitted sequences (held or still to be taken)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def num_uncommitted(self) -> int:
        """Blocks a new sequence may still be promised."""
        return self.num_blocks - self.committed

    def can_commit(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= self.num_uncommitted

    def commit(self, tokens: int) -> int:
        """Promise room for `tokens`; returns the blocks promised (give them back with release)."""
        blocks = self.blocks_for(tokens)
        if blocks > self.num_uncommitted:
            raise RuntimeError(f"{blocks} blocks asked, {self.num_uncommitted} uncommitted")
        self.committed += blocks
        return blocks

    def grow(self, table: list[int], tokens: int, promised: int) -> None:
        """Extend a block table in place to cover `tokens` tokens, within what was promised."""
        need = self.blocks_for(tokens)
        if need > promised:
            raise RuntimeError(f"{tokens} tokens need {need} blocks, {promised} were promised")
        while len(table) < need:
            table.append(heapq.heappop(self.free_blocks))

    def release(self, table: list[int], promised: int) -> None:
        """A sequence ended: its blocks go back to the free list, its promise is withdrawn."""
        for block in table:
            heapq.heappush(self.free_blocks, block)
        table.clear()
        self.committed -= promised
