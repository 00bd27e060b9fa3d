"""A request as the token service sees it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import Enum

from common.protocol import DecodeEvent, SamplingParams


class SeqStatus(Enum):
    WAITING_FOR_KV = "waiting_for_kv"   # reserved; KV arriving from the prompt service
    RUNNING = "running"                 # in the running batch
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass
class Sequence:
    request_id: str
    prompt_len: int                     # tokens
    max_tokens: int                     # output tokens, EOS included
    num_layers: int
    promised: int = 0                   # KV blocks promised to it at admission (prompt + max_tokens)
    blocks: list[int] = field(default_factory=list)  # its block table: position p is in blocks[p // block_size]
    created: float = field(default_factory=time.monotonic)
    status: SeqStatus = SeqStatus.WAITING_FOR_KV
    received: list[int] = field(default_factory=list)  # per layer: prompt tokens [0, n) whose KV is here
    sampling: SamplingParams | None = None   # set when the decode request arrives
    output: list[int] = field(default_factory=list)  # output tokens from first_index on
    first_index: int = 0                # output index of output[0] (> 0 on a resumed request)
    epoch: int = 0                      # the request's epoch when this service took it (fencing)
    filling: bool = False               # its row is being written: a restore, or a prefill here (colocated)
    events: asyncio.Queue[DecodeEvent] = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.max_tokens < 1:
            raise ValueError(f"sequence {self.request_id}: prompt_len and max_tokens must be >= 1")
        self.received = [0] * self.num_layers

    @property
    def kv_ready(self) -> bool:
        return all(n == self.prompt_len for n in self.received)

    @property
    def layers_complete(self) -> int:
        return sum(n == self.prompt_len for n in self.received)

    def mark_received(self, layers: range, start: int, end: int) -> None:
        """KV of prompt tokens [start, end) arrived for `layers`. Each layer's tokens come in order,
        without a gap; a range that starts earlier rewrites (a prefill retried on another prompt
        service after a failed transfer sends the whole prompt again)."""
        if any(self.received[layer] < start for layer in layers):
            raise ValueError(f"tokens [{start}, {end}) of layers [{layers.start}, {layers.stop}) would leave a gap: "
                             f"the layers have {[self.received[layer] for layer in layers]}")
        for layer in layers:
            self.received[layer] = max(self.received[layer], end)

    def mark_all_received(self) -> None:
        self.received = [self.prompt_len] * self.num_layers

    @property
    def decoding(self) -> bool:
        """Its decode request has arrived and its KV is complete: it can run."""
        return self.sampling is not None and self.kv_ready

    @property
    def next_index(self) -> int:
        """Output index of the token the next step produces."""
        return self.first_index + len(self.output)

    @property
    def last_position(self) -> int:
        """Sequence position of the newest output token: the input of the next step."""
        return self.prompt_len + len(self.output) - 1

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV this sequence holds (after the next step's write)."""
        return self.prompt_len + len(self.output)

    @property
    def done(self) -> bool:
        return self.status in (SeqStatus.FINISHED, SeqStatus.ABORTED)
