"""Microbatch KV swapping (`--swap`, DéjàVu §4.3): a token stage keeps on the device only the KV of
the microbatch it computes and of the next one, prefetched while it computes; every sequence's KV
lives in host memory (pinned on CUDA), in the pool that the rest of the service knows.

    swap = SwapPool(runner, num_blocks=4096, device_blocks=256)
    staged = swap.prefetch(segments)            # when a step is known: its KV starts moving in
    logits = swap.forward(runner, staged)       # on the engine thread: waits for it, computes, swaps out

- `host` is the pool of record, with the block tables the scheduler hands out: prompt KV, restores,
  replication and a pipeline's gathers read and write it as they do a plain pool.
- `device` is the budget (--kv-device-bytes): `device_blocks` blocks. A step's segments get device
  blocks for their tokens; the KV they have, [0, start) of each, is copied in (`prefetch`, on a copy
  thread of its own, CUDA: its own stream), attention runs on the device pool with the remapped
  block tables, and only the tokens the step wrote, [start, end) (one per decode segment), are
  copied back out: the host keeps the rest already (DéjàVu's incremental swap-out).
- A step's device blocks are free again once its forward is done. The scheduler keeps a step
  within half the device (`step_blocks`): the one computing and the next one prefetched fit. A
  prefetch that finds the device full waits, in order, for the step before it to finish.

On CPU the "device" is another region of host memory: every step pays for its copies and gains
nothing (a CPU has no smaller, faster memory to fit). The code is the one a GPU runs; bench/swap.py
measures what it costs here and says what a GPU changes.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from prometheus_client import Counter, Gauge, Histogram

from engine.attention import Segment, slots_of

log = logging.getLogger(__name__)

SWAP_WAIT_S = 60.0  # a prefetch waits this long for device room (a step never finishing): then the step fails
SWAPPED_IN = Counter("dejavu_swap_in_bytes", "KV bytes copied from host memory to the device (--swap)")
SWAPPED_OUT = Counter("dejavu_swap_out_bytes", "KV bytes copied from the device to host memory (--swap)")
SWAP_WAIT = Histogram("dejavu_swap_wait_seconds", "how long a step waited for its KV to be swapped in (--swap)",
                      buckets=(.0001, .001, .005, .01, .025, .05, .1, .2, .4, .8))
DEVICE_BLOCKS_USED = Gauge("dejavu_swap_device_blocks_used", "device KV blocks held by steps (prefetched or computing)")


@dataclass
class Staged:
    """One step on the device: its segments over device blocks, where its new tokens go back to."""

    segments: list[Segment]
    blocks: list[int]             # device blocks it holds
    host_out: torch.Tensor        # host slots of the tokens the step writes
    device_out: torch.Tensor      # their device slots
    claimed: bool = False         # by forward (computes, then frees) or discard (frees)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def claim(self) -> bool:
        with self.lock:
            first, self.claimed = not self.claimed, True
            return first


class SwapPool:
    def __init__(self, runner, num_blocks: int, device_blocks: int):
        if device_blocks < 2:
            raise ValueError(f"a device KV budget of {device_blocks} blocks: --swap needs room for two steps")
        self.block_size, self.device_blocks = runner.block_size, device_blocks
        cuda = runner.device.type == "cuda"
        self.host = runner.new_pool(num_blocks, device="cpu")
        if cuda:
            self.host = self.host.pin_memory()
        self.device = runner.new_pool(device_blocks)
        self.token_bytes = self.host[:, :, :1].nbytes  # one token, this process's layers
        self._free = list(range(device_blocks - 1, -1, -1))  # a stack: lowest first
        self._room = threading.Condition()
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="swap")  # prefetches run in order
        self._stream = torch.cuda.Stream(runner.device) if cuda else None

    @property
    def step_blocks(self) -> int:
        """Most device blocks one step may hold: half the device, so that the next one fits beside it."""
        return self.device_blocks // 2

    @property
    def blocks_used(self) -> int:
        with self._room:
            return self.device_blocks - len(self._free)

    def blocks_of(self, segments: list[Segment]) -> int:
        return sum(-(-s.end // self.block_size) for s in segments)

    def prefetch(self, segments: list[Segment]) -> Future:
        """Start moving a step's KV in; -> a future of its Staged. Call in the order the steps compute."""
        return self._copier.submit(self._swap_in, segments)

    def forward(self, runner, staged: Future, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """On the engine thread: wait for the step's KV, compute over the device pool, copy the new
        tokens' KV out to the host pool, free the device blocks."""
        start = time.perf_counter()
        step: Staged = staged.result()
        SWAP_WAIT.observe(time.perf_counter() - start)
        if not step.claim():
            raise RuntimeError("a swapped-in step was discarded before it computed")
        try:
            out = runner.forward(step.segments, self.device, None, hidden)
            # on the compute stream, a blocking copy: it waits for the forward's writes, and once it
            # is done no kernel of this step reads the device blocks given back below
            moved = self.device.index_select(2, step.device_out.to(self.device.device)).to(self.host.device)
            self.host.index_copy_(2, step.host_out, moved)
            SWAPPED_OUT.inc(len(step.host_out) * self.token_bytes)
            return out
        finally:
            self._give(step.blocks)

    def discard(self, staged: Future) -> None:
        """A step that will not compute (cancelled, failed before its forward): its device blocks
        go back once its swap-in is over. A no-op for one its forward has claimed."""
        def done(f: Future) -> None:
            if f.exception() is None and f.result().claim():
                self._give(f.result().blocks)
        staged.add_done_callback(done)

    def close(self) -> None:
        self._copier.shutdown(wait=False, cancel_futures=True)

    # -- on the copy thread ---------------------------------------------------------------------
    def _swap_in(self, segments: list[Segment]) -> Staged:
        need = self.blocks_of(segments)
        blocks = self._take(need)
        try:
            bs, mapped, host_in, device_in, host_out, device_out = self.block_size, [], [], [], [], []
            it = iter(blocks)
            for s in segments:
                table = [next(it) for _ in range(-(-s.end // bs))]
                mapped.append(Segment(s.tokens, s.start, table))
                host_in.append(slots_of(s.blocks, bs, 0, s.start))
                device_in.append(slots_of(table, bs, 0, s.start))
                host_out.append(slots_of(s.blocks, bs, s.start, s.end))
                device_out.append(slots_of(table, bs, s.start, s.end))
            host_in, device_in = torch.cat(host_in), torch.cat(device_in)
            if len(host_in):
                self._copy_in(host_in, device_in)
                SWAPPED_IN.inc(len(host_in) * self.token_bytes)
            return Staged(mapped, blocks, torch.cat(host_out), torch.cat(device_out))
        except BaseException:
            self._give(blocks)
            raise

    def _copy_in(self, host_slots: torch.Tensor, device_slots: torch.Tensor) -> None:
        """device[:, :, device_slots] = host[:, :, host_slots]: every layer's K and V of those
        tokens, one gather and one scatter. CUDA: gathered into pinned memory, copied and scattered
        on the swap stream, done before the step's forward starts (the future resolves after). The
        device blocks it writes were given back after a blocking copy: no kernel reads them."""
        if self._stream is None:
            self.device.index_copy_(2, device_slots, self.host.index_select(2, host_slots))
            return
        staged = self.host.index_select(2, host_slots).pin_memory()
        with torch.cuda.stream(self._stream):
            self.device.index_copy_(2, device_slots.to(self.device.device),
                                    staged.to(self.device.device, non_blocking=True))
        self._stream.synchronize()

    def _take(self, n: int) -> list[int]:
        if n > self.device_blocks:
            raise ValueError(f"a step of {n} KV blocks does not fit the device's {self.device_blocks} (--kv-device-bytes)")
        with self._room:
            if not self._room.wait_for(lambda: len(self._free) >= n, timeout=SWAP_WAIT_S):
                raise RuntimeError(f"no device room for a step of {n} KV blocks in {SWAP_WAIT_S:.0f} s "
                                   f"({len(self._free)} of {self.device_blocks} free)")
            taken = [self._free.pop() for _ in range(n)]
            DEVICE_BLOCKS_USED.set(self.device_blocks - len(self._free))
            return taken

    def _give(self, blocks: list[int]) -> None:
        with self._room:
            self._free.extend(reversed(blocks))
            DEVICE_BLOCKS_USED.set(self.device_blocks - len(self._free))
            self._room.notify_all()
