"""Continuous batching: which sequences run this step, and what their results mean.

Every step takes every sequence that is ready (decode request in, KV complete); sequences join
and leave between any two steps. Each contributes one segment: its input token (its newest, or one
it replays after a resume: Sequence.input_token), at that token's position, over its block table.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.protocol import TokenEvent
from engine.attention import Segment
from token_service.sequence import Sequence, SeqStatus


@dataclass
class Batch:
    seqs: list[Sequence]          # running sequences
    segments: list[Segment]       # one per sequence: its input token at its position

    @property
    def sampled(self) -> list[int]:
        """Rows of the sequences whose logits are sampled: all but those replaying a token."""
        return [i for i, s in enumerate(self.seqs) if not s.replay]


class Scheduler:
    def __init__(self, block_size: int = 16) -> None:
        self.seqs: dict[str, Sequence] = {}
        self.block_size = block_size
        self.steps = 0  # batches scheduled so far

    def add(self, seq: Sequence) -> None:
        self.seqs[seq.request_id] = seq

    def schedule(self, busy: frozenset[str] | set[str] = frozenset(), parts: int = 1,
                 max_blocks: int | None = None) -> Batch | None:
        """The running sequences, but those `busy` (in a microbatch still in flight, whose token is
        not back yet): all of them, or with `parts` microbatches in flight (a pipeline's head,
        token_service/pipeline.py) an even share of the running ones at most, and (--swap) no more
        than fit in `max_blocks` KV blocks. Those that waited longest go first."""
        for seq in self.seqs.values():
            if seq.status is SeqStatus.WAITING_FOR_KV and seq.decoding:
                seq.status = SeqStatus.RUNNING
        running = [s for s in self.seqs.values() if s.status is SeqStatus.RUNNING]
        share = -(-len(running) // parts)
        running = [s for s in running if s.request_id not in busy]
        if max_blocks is not None:  # fewer fit than run: whoever waited longest first, or some would starve
            running.sort(key=lambda s: s.scheduled)
        running = running[:share]
        if max_blocks is not None:
            fit, used = [], 0
            for s in running:
                used += -(-(s.input_position + 1) // self.block_size)
                if used > max_blocks:
                    break
                fit.append(s)
            running = fit
        if not running:
            return None
        self.steps += 1
        for s in running:
            s.scheduled = self.steps
        return Batch(running, [Segment([s.input_token], s.input_position, s.blocks) for s in running])

    def postprocess(self, batch: Batch, events: list[TokenEvent]) -> list[tuple[Sequence, TokenEvent | None]]:
        """Append each sampled token and decide whether its sequence finishes. `events` holds one
        per sequence that did not replay a token; one that did gets None (it sampled nothing)."""
        out, sampled = [], iter(events)
        for seq in batch.seqs:
            event = None if seq.replay else next(sampled)
            if seq.done:  # aborted while the step ran
                continue
            if event is None:
                seq.replayed()
                out.append((seq, None))
                continue
            seq.output.append(event.token_id)
            reason = event.finish_reason or finish_reason(seq, event.token_id)  # set: a grammar completed
            if reason:
                event = event.model_copy(update={"finish_reason": reason})
                seq.status = SeqStatus.FINISHED
            out.append((seq, event))
        return out

    def remove(self, request_id: str) -> Sequence | None:
        return self.seqs.pop(request_id, None)


def finish_reason(seq: Sequence, token: int) -> str | None:
    p = seq.sampling
    if token in p.stops:
        return "stop"
    if seq.first_index + len(seq.output) >= p.max_tokens:
        return "length"
    return None
