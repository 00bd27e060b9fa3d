"""The simulated services: a request (Job), the cores engines compute on (Host), prompt and token
services. The event loop, admission and failures that drive them are in simulate.py.

A job's life, as in the real system (ARCHITECTURE.md §3):
1. admission: it holds a slot on one token service (`service`) before any prefill;
2. prefill: on a prompt service (disaggregated) or its token service (colocated) it computes
   `prefill_tokens` tokens, in chunks when long; the forward that ends it gives its first token;
3. decode: it runs in every step of its token service, one token each, until `output_tokens`;
   then its slot is free.
After a failure it goes back to 1: with a replica it skips 2 (`resume`), without one its prefill
covers the prompt and every token it had (re-prefill), and gives the next token.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass


@dataclass(eq=False)
class Job:
    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int                # tokens it gets, the prefill's first one included
    generated: int = 0                # tokens out so far
    prefilled: int = 0                # tokens of its current prefill computed (chunks)
    first_token_s: float | None = None
    done_s: float | None = None
    service: TokenService | None = None  # where it holds a slot
    resume: bool = False              # back from a failure with a replica: no prefill
    restarts: int = 0                 # failures it went through
    attempt: int = 0                  # bumped when a failure re-routes it: voids its forwards in flight

    @property
    def prefill_tokens(self) -> int:
        """A first prefill: the prompt; a re-prefill after a failure: the prompt and every token out."""
        return self.prompt_tokens + self.generated

    @property
    def kv_len(self) -> int:
        return self.prompt_tokens + self.generated


class Host:
    """The cores engines compute on: one forward at a time, first come first served. Each service
    has its own, or all of a layout share one (`--cpu-placement turns` on one machine)."""

    def __init__(self) -> None:
        self.holder = None
        self.waiting: collections.deque = collections.deque()  # (service, start callback)

    def acquire(self, service, start) -> None:
        if self.holder is None:
            self.holder = service
            start()
        else:
            self.waiting.append((service, start))

    def release(self, service) -> None:
        if self.holder is not service:
            return
        self.holder = None
        if self.waiting:
            self.holder, start = self.waiting.popleft()
            start()

    def cancel(self, service) -> None:
        """A failed service gives its turn back, or leaves the queue."""
        self.waiting = collections.deque((s, f) for s, f in self.waiting if s is not service)
        self.release(service)


class Engine:
    """What prompt and token services share: a host, alive or failed, one forward at a time. A
    failure bumps `epoch`, which voids the end of the forward that was in flight."""

    def __init__(self, sim, name: str, host: Host):
        self.sim, self.name, self.host = sim, name, host
        self.alive, self.busy, self.epoch = True, False, 0

    def kick(self) -> None:
        """Start a forward when there is work and none is in flight: after the other events of this
        instant (requests arriving together batch together), then after waiting for the host."""
        if self.alive and not self.busy and self.has_work():
            self.busy = True
            epoch = self.epoch
            self.sim.at(self.sim.now, lambda: self._acquire(epoch))

    def _acquire(self, epoch: int) -> None:
        if epoch == self.epoch:  # not failed since the kick
            self.host.acquire(self, self._start)

    def _start(self) -> None:
        seconds, done = self.plan_forward()
        if done is None:  # the work went away while waiting for the host
            self._idle()
            return
        epoch = self.epoch
        self.sim.at(self.sim.now + seconds, lambda: self._finish(epoch, done))

    def _finish(self, epoch: int, done) -> None:
        if epoch != self.epoch:  # failed while it computed: the forward is lost
            return
        self._idle()
        done()
        self.kick()

    def _idle(self) -> None:
        self.busy = False
        self.host.release(self)

    def fail(self) -> list[Job]:
        """Down: the forward in flight is lost; returns the jobs it held (the caller re-routes them)."""
        self.alive, self.epoch = False, self.epoch + 1
        if self.busy:
            self.busy = False
            self.host.cancel(self)
        return self.drop_all()


class PromptService(Engine):
    def __init__(self, sim, name: str, host: Host):
        super().__init__(sim, name, host)
        self.queue: collections.deque[Job] = collections.deque()
        self.in_flight: list = []  # (job, attempt, tokens): the forward computing now

    @property
    def load(self) -> int:
        """Prefills in flight here, as the gateway counts them (queued or computing)."""
        computing = [job for job, attempt, _ in self.in_flight if attempt == job.attempt]
        return len(computing) + sum(j not in computing for j in self.queue)

    def has_work(self) -> bool:
        return bool(self.queue)

    def plan_forward(self):
        """prompt_service/engine.py's batching: whole prompts back to back up to the budget, or the
        next chunk of a longer one (alone); m · prefill time, the KV streaming out meanwhile."""
        pieces, budget = [], self.sim.layout.prefill_budget
        while self.queue and budget > 0:
            job = self.queue[0]
            left = job.prefill_tokens - job.prefilled
            if pieces and (left > budget or job.prefilled):
                break
            n = min(left, budget)
            pieces.append((job, job.attempt, n))
            budget -= n
            if n < left:
                break  # a chunk: the job stays at the head for its next one
            self.queue.popleft()
            if job.prefilled:
                break  # the last chunk of a prompt: alone too
        if not pieces:
            return 0.0, None
        self.in_flight = pieces
        mean = sum(n for _, _, n in pieces) / len(pieces)
        return self.sim.profile.m * self.sim.profile.prefill_s(len(pieces), mean), lambda: self._done(pieces)

    def _done(self, pieces) -> None:
        self.in_flight = []
        for job, attempt, n in pieces:
            if attempt != job.attempt:  # its token service failed meanwhile: it was routed again
                continue
            job.prefilled += n
            if job.prefilled >= job.prefill_tokens:
                job.prefilled = 0
                self.sim.prefilled(job)

    def drop_all(self) -> list[Job]:
        computing = [job for job, attempt, _ in self.in_flight if attempt == job.attempt]
        lost = computing + [j for j in self.queue if j not in computing]  # a chunked prompt is in both
        self.queue.clear()
        self.in_flight = []
        return lost


class TokenService(Engine):
    def __init__(self, sim, name: str, host: Host):
        super().__init__(sim, name, host)
        self.running: list[Job] = []                             # decoding: in the next step
        self.prefills: collections.deque[Job] = collections.deque()  # colocated: prompts to chunk
        self.slots = 0                                           # jobs holding a slot here

    @property
    def free_slots(self) -> int:
        return self.sim.layout.max_seqs - self.slots if self.alive else 0

    def has_work(self) -> bool:
        return bool(self.running or self.prefills)

    def plan_forward(self):
        """One step: every running sequence (step_s at their mean KV length) and, colocated, up to
        chunk_tokens of prompt (token_service/prefill.py: whole chunks, first come first served);
        plus the step's serving overhead (overhead_s of its decoding sequences), which holds the
        host too: it is CPU work on the same cores (on a real shared host the turn covers only
        the forward, and that work competes for the cores instead)."""
        batch, chunks, left = list(self.running), [], self.sim.layout.chunk_tokens
        for job in self.prefills:
            n = min(job.prefill_tokens - job.prefilled, self.sim.layout.chunk_tokens)
            if n > left:
                break
            chunks.append((job, n))
            left -= n
        if not batch and not chunks:
            return 0.0, None
        profile = self.sim.profile
        kv_len = sum(j.kv_len for j in batch) / len(batch) if batch else 0.0
        seconds = profile.step_s(len(batch), kv_len) + profile.overhead_s(len(batch))  # step_s(0, ...) = 0
        if chunks:
            seconds += profile.prefill_s(len(chunks), sum(n for _, n in chunks) / len(chunks))
        return seconds, lambda: self._done(batch, chunks)

    def _done(self, batch: list[Job], chunks) -> None:
        for job in batch:
            job.generated += 1
            if job.generated >= job.output_tokens:
                self.finish(job)
        for job, n in chunks:
            job.prefilled += n
            if job.prefilled >= job.prefill_tokens:
                job.prefilled = 0
                self.prefills.remove(job)
                self.sim.prefilled(job)

    def join(self, job: Job) -> None:
        """Its KV is in (streamed, restored or computed here): it decodes from the next step on."""
        if job.generated >= job.output_tokens:
            self.finish(job)
            return
        self.running.append(job)
        self.kick()

    def finish(self, job: Job) -> None:
        if job in self.running:
            self.running.remove(job)
        self.slots -= 1
        self.sim.done(job)

    def drop_all(self) -> list[Job]:
        """Every job holding a slot here: decoding, prefilling here, or prefilling on a prompt service."""
        lost = [j for j in self.sim.jobs if j.service is self and j.done_s is None]
        self.running, self.prefills, self.slots = [], collections.deque(), 0
        return lost
