"""A request as the token service sees it."""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from enum import Enum

from common.protocol import DecodeEvent, SamplingParams
from common.grammar import Matcher
from common.sampling import History


class SeqStatus(Enum):
    WAITING_FOR_KV = "waiting_for_kv"   # reserved; KV arriving from the prompt service
    RUNNING = "running"                 # in the running batch
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass
class Sequence:
    request_id: str
    prompt_len: int                     # tokens before output[0] (a resume: the prompt + the tokens out but one)
    max_tokens: int                     # output tokens, EOS included
    num_layers: int
    promised: int = 0                   # KV blocks promised to it at admission (prompt + max_tokens)
    blocks: list[int] = field(default_factory=list)  # its block table: position p is in blocks[p // block_size]
    created: float = field(default_factory=time.monotonic)
    status: SeqStatus = SeqStatus.WAITING_FOR_KV
    received: list[int] = field(default_factory=list)  # per layer: prompt tokens [0, n) whose KV is here
    replay: collections.deque[int] = field(default_factory=collections.deque)  # see `input_token`
    sampling: SamplingParams | None = None   # set when the decode request arrives
    output: list[int] = field(default_factory=list)  # output tokens from first_index on
    first_index: int = 0                # output index of output[0] (> 0 on a resumed request)
    history: list[int] = field(default_factory=list)  # penalties, grammar: prompt + the outputs before output[0] (DecodeRequest.history)
    counted: History | None = field(default=None, repr=False)  # `penalties`, kept from step to step
    matcher: Matcher | None = field(default=None, repr=False)  # its grammar's, the outputs before output[0] consumed
    epoch: int = 0                      # the request's epoch when this service took it (fencing)
    attempt: str | None = None          # the /reserve call that took its room (ReserveRequest.attempt)
    filling: bool = False               # its row is being written: a restore, a prefill here (colocated), prompt KV sent on to a pipeline's stages
    stepping: bool = False              # in a decode step now (its row is being read and written)
    scheduled: int = 0                  # the scheduler's batch number it last ran in (who waited longest)
    events: asyncio.Queue[DecodeEvent | None] = field(default_factory=asyncio.Queue)  # None: a token replayed

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.max_tokens < 1:
            raise ValueError(f"sequence {self.request_id}: prompt_len and max_tokens must be >= 1")
        self.received = [0] * self.num_layers

    @property
    def kv_ready(self) -> bool:
        """Every layer has the KV of the prompt, but for the tokens still to replay."""
        return all(n == self.prompt_len - len(self.replay) for n in self.received)

    def mark_received(self, layers: range, start: int, end: int) -> None:
        """KV of prompt tokens [start, end) arrived for `layers`. Each layer's tokens come in order,
        without a gap; a range that starts earlier rewrites (a prefill retried on another prompt
        service after a failed transfer sends the whole prompt again)."""
        if any(self.received[layer] < start for layer in layers):
            raise ValueError(f"tokens [{start}, {end}) of layers [{layers.start}, {layers.stop}) would leave a gap: "
                             f"the layers have {[self.received[layer] for layer in layers]}")
        for layer in layers:
            self.received[layer] = max(self.received[layer], end)

    def mark_all_received(self, n: int) -> None:
        """The KV of prompt tokens [0, n) is here for every layer (a restore, a prefill here)."""
        self.received = [n] * self.num_layers

    def replayed(self) -> None:
        """A decode step has written the KV of the token it replayed."""
        self.replay.popleft()
        self.mark_all_received(self.prompt_len - len(self.replay))

    @property
    def decoding(self) -> bool:
        """Its decode request has arrived and its KV is complete: it can run."""
        return self.sampling is not None and self.kv_ready

    @property
    def next_index(self) -> int:
        """Output index of the token the next step produces."""
        return self.first_index + len(self.output)

    def penalties(self, vocab: int) -> History:
        """What the penalties count and the grammar follows for the next pick: the prompt and every
        output token so far."""
        if self.counted is None:  # once: the history is not needed after
            cut = len(self.history) - self.first_index
            self.counted = History(vocab, self.history[:cut], self.history[cut:], self.matcher)
            self.history = []
        return self.counted.update(self.output)

    @property
    def last_position(self) -> int:
        """Sequence position of the newest output token."""
        return self.prompt_len + len(self.output) - 1

    @property
    def input_token(self) -> int:
        """The next step's input: the newest output token, or on a resume first the `replay`
        tokens, the prompt's last ones (tokens already streamed by the failed owner) whose KV came
        neither from the prefill nor the replica. Their KV is computed here one decode step each,
        as it was first computed (a forward over several tokens rounds differently); nothing is
        sampled or emitted for them."""
        return self.replay[0] if self.replay else self.output[-1]

    @property
    def input_position(self) -> int:
        """Sequence position of `input_token`: the KV of [0, input_position) is here."""
        return self.prompt_len - len(self.replay) if self.replay else self.last_position

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV this sequence holds (after the next step's write)."""
        return self.prompt_len + len(self.output)

    @property
    def done(self) -> bool:
        return self.status in (SeqStatus.FINISHED, SeqStatus.ABORTED)
