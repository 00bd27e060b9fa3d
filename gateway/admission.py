"""Admission: requests that find no KV room wait here, in order, instead of hammering token services.

A request's path through admission (`Admission.admit`):
1. It joins the back of the queue (a resumed request, already streaming to its client, joins the
   front), or gets a 429 with Retry-After if --max-queued-requests are waiting already. Once the
   head's try found no room, that is; while the head may still find some (its try under way, KV
   freed since: a burst arriving together) up to BURST more join, and once a try finds none the
   newest past the bound are refused (`_trim`).
2. Only the head tries to reserve (`attempt`): at once when it gets there, so with nobody waiting
   a request goes straight through; most stop here. Trying one at a time is what keeps arrival
   order: arrivals that all tried at once would be admitted in the order their answers came back.
3. No room: the head tries again when woken: a request of this gateway released its KV (`wake`),
   a token service's lease shows KV freed (another gateway's request ended), or POLL_S passed.
   Whoever leaves the queue, served or not, hands the turn to the next head at once.
4. Past --route-timeout-s in the queue: a 429 as well. A client that leaves just leaves the queue.

A refusal by a full token service is expected here, not an incident: nothing is logged for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram

from common.errors import Overloaded

T = TypeVar("T")
POLL_S = 0.5  # the head retries at least this often: a release on another gateway may go unseen
BURST = 64  # arrivals let in past --max-queued-requests while the head may still find room for them (see _trim)
QUEUED = Gauge("dejavu_gateway_queued_requests", "requests waiting for KV room on a token service")
QUEUE_SECONDS = Histogram("dejavu_gateway_queue_seconds", "time a request waited for KV room before it was admitted",
                          buckets=(.01, .05, .1, .25, .5, 1, 2, 4, 8, 16, 32, 64, 128))
REJECTED = Counter("dejavu_gateway_rejected_requests_total", "requests refused with a 429", ["reason"])


class Admission:
    def __init__(self, max_queued: int, timeout_s: float):
        self.max_queued, self.timeout_s = max_queued, timeout_s
        self.queue: deque[asyncio.Event] = deque()  # one event per waiter: set when it is its turn to try
        self.drain_s = 1.0  # running mean of the time between two admissions from the queue (for Retry-After)
        self._last_admit = 0.0
        self.full = False  # the head's last try found no room (and nothing was freed since)
        self._front: set[asyncio.Event] = set()  # resumed requests' turns: never refused
        self._refused: dict[asyncio.Event, Overloaded] = {}  # turns cut from the queue (`_trim`), to raise

    async def admit(self, attempt: Callable[[], Awaitable[T | None]], front: bool = False,
                    timeout_s: float | None = None) -> T:
        """What `attempt` returns once it returns something (None: no room now), in arrival order;
        Overloaded past `timeout_s` in the queue (default: the queue's own)."""
        if not front and self._refused_at_the_door():
            raise self._refuse("queue_full", self._full_message())
        turn, start = asyncio.Event(), time.monotonic()
        # in the queue from the first try: arrivals that try at once would be admitted in the order they got an answer
        self.queue.appendleft(turn) if front else self.queue.append(turn)
        if front:
            self._front.add(turn)
        QUEUED.set(len(self.queue))
        deadline = start + (self.timeout_s if timeout_s is None else timeout_s)
        try:
            while True:
                if refusal := self._refused.pop(turn, None):
                    raise refusal
                if self.queue[0] is turn:  # the head tries (at once when it arrives at the head)
                    turn.clear()
                    if (got := await attempt()) is not None:
                        self.full = False
                        self._admitted(start)
                        return got
                    self.full = True
                    self._trim()
                    if not self.max_queued and not front:  # no waiting allowed
                        raise self._refuse("queue_full", "the server is at capacity (--max-queued-requests 0); "
                                           "retry later")
                else:
                    turn.clear()  # not the head (a resumed request went in front): the one ahead wakes us as it leaves
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._refuse("queue_timeout", f"no KV room became free in {deadline - start:.0f} s "
                                       "(--route-timeout-s); the server is at capacity, retry later")
                with contextlib.suppress(TimeoutError):  # (asyncio.timeout: wait_for on 3.11 can swallow
                    async with asyncio.timeout(min(POLL_S, left)):  # a cancel that comes as the turn does)
                        await turn.wait()
        finally:
            head = bool(self.queue) and self.queue[0] is turn
            if turn in self.queue:  # (not one `_trim` cut)
                self.queue.remove(turn)
            self._front.discard(turn)
            self._refused.pop(turn, None)
            QUEUED.set(len(self.queue))
            if head and self.queue:  # the next head tries now: the room may fit it too
                self.queue[0].set()

    def _refused_at_the_door(self) -> bool:
        """A new arrival's 429 before it joins: with no queue allowed, behind anyone; past the
        bound, once a try found no room; and past the bound by BURST in any case."""
        if not self.max_queued:
            return bool(self.queue)
        return self._waiting() >= self.max_queued + BURST or (self.full and self._waiting() >= self.max_queued)

    def _waiting(self) -> int:
        """New requests in the queue (resumed ones, in front, are not bounded)."""
        return len(self.queue) - len(self._front)

    def _full_message(self) -> str:
        return (f"the server is at capacity and {self._waiting()} requests are waiting already "
                f"(--max-queued-requests {self.max_queued}); retry later")

    def _trim(self) -> None:
        """The head found no room: every request in the queue waits, so past --max-queued-requests
        the newest are refused now. Arrivals are let in while the server may have room (the head
        trying, a release since): a burst that came together was refused beyond the first few, whose
        reservations were still on their way, with places free to run and to wait (a probe: 2 of 12
        admitted at --max-seqs 2 --max-queued-requests 2, not 4)."""
        for turn in reversed(list(self.queue)):
            if self._waiting() <= self.max_queued:
                return
            if turn not in self._front and turn is not self.queue[0]:
                self.queue.remove(turn)
                self._refused[turn] = self._refuse("queue_full", self._full_message())
                turn.set()

    def _refuse(self, reason: str, message: str) -> Overloaded:
        REJECTED.labels(reason).inc()
        return Overloaded(message, code=reason, retry_after=self.retry_after())

    def wake(self) -> None:
        """KV may have been freed: the head of the queue tries again now (arrivals meanwhile join it)."""
        self.full = False
        if self.queue:
            self.queue[0].set()

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved on enough for a new request (at least 1)."""
        return max(1, min(60, math.ceil(len(self.queue) * self.drain_s)))

    def _admitted(self, start: float) -> None:
        now = time.monotonic()
        QUEUE_SECONDS.observe(now - start)
        if self._last_admit >= start:  # the queue was never empty in between: a drain interval
            self.drain_s = 0.8 * self.drain_s + 0.2 * min(now - self._last_admit, 60.0)
        self._last_admit = now
