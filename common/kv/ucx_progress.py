"""UCX progressed by the event loop itself: no progress thread, no notifier thread.

ucxx's default ("thread" mode, with Python futures) runs a C++ progress thread that waits on the
worker's events and hands each completed request to ucxx's notifier thread, a Python thread, which
schedules a coroutine on the event loop to set the request's future: three threads and two
hand-overs a message, where a TCP socket wakes the loop once. Here the worker's wake-up descriptor is
one more reader of the loop. On an event the loop progresses the worker, completes the futures of the
requests that finished and re-arms the worker, all on its own thread; requests are posted there too,
and a send that UCX completes at once returns without a wait. A small frame and its acknowledgement
took 0.43-0.51 ms this way against 0.87-1.83 ms in ucxx's thread mode (docs/BENCHMARKS.md §1,
"December 4").

`install()` puts LoopProgress in the place of ucxx's "blocking" mode, which common/kv/ucx.py selects
(with Python futures off) in its `ucxx.init(...)`, which then starts one for the running loop.
Engine steps run on a thread of their own (engine/runner.py), so the loop is free to progress UCX
while a forward computes.
"""

from __future__ import annotations

import asyncio
import weakref

import numpy as np

from common.kv.transport import TransportError

# how many progress-and-arm rounds one turn of the loop runs before it lets the loop's other
# callbacks in (a stream of events can keep the worker busy: arm() refuses while any is pending)
ROUNDS_PER_TURN = 16


class LoopProgress:
    """Progresses one ucxx worker from one event loop; ucxx.init() makes it (see `install`).

    ucxx's own awaitables (endpoint creation and close) poll their requests from the loop, which
    progresses the worker for them when it has events. BACKSTOP_S progresses it regardless, should
    an event be missed: a backstop, not a poll (an idle process wakes 10 times a second)."""

    BACKSTOP_S = 0.1
    running: dict[asyncio.AbstractEventLoop, LoopProgress] = {}  # as ucxx's own ProgressTasks

    def __init__(self, worker, event_loop: asyncio.AbstractEventLoop):
        from ucxx._lib.arr import Array
        from ucxx.exceptions import UCXCloseError
        from ucxx.types import Tag, TagMaskFull

        self.worker, self.event_loop = worker, event_loop
        # ucxx's types, resolved once here rather than on every message (ucxx is imported by now)
        self._array, self._tag, self._tag_mask, self._closed_error = Array, Tag, TagMaskFull, UCXCloseError
        self._pending: dict[object, asyncio.Future[None]] = {}  # a ucxx request -> its waiter's future
        # requests whose waiter was cancelled, with their buffers: UCX may still write or read them
        # (a rendezvous under way) until the request completes or its endpoint closes
        self._orphans: dict[object, np.ndarray] = {}
        worker.init_blocking_progress_mode()
        self._fd = worker.epoll_file_descriptor
        self._ref = weakref.ref(self)  # the loop's callbacks must not keep this alive past ucxx.reset()
        self._poked = False  # a progress is queued on the loop: pokes merge into it
        previous = LoopProgress.running.get(event_loop)
        if previous is not None:  # ucxx made another worker for this loop: the old one's requests end
            previous.stop("UCX was initialised again on this event loop")
        event_loop.add_reader(self._fd, _progress, self._ref)
        self._backstop = event_loop.call_later(self.BACKSTOP_S, _backstop, self._ref)
        LoopProgress.running[event_loop] = self

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LoopProgress | None:
        return cls.running.get(loop)

    def stop(self, why: str) -> None:
        """Before the worker goes (ucxx.reset()), on its loop's thread: a last progress, then the
        descriptor leaves the loop and every request still awaited fails (TransportError(why))."""
        if LoopProgress.running.get(self.event_loop) is not self:
            return
        del LoopProgress.running[self.event_loop]
        self._backstop.cancel()
        try:
            if not self.event_loop.is_closed():
                self._progress_rounds(ROUNDS_PER_TURN)
        finally:
            if not self.event_loop.is_closed():
                self.event_loop.remove_reader(self._fd)
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(TransportError(why))  # one each: a shared one's traceback grows
            self._pending.clear()
            self._orphans.clear()

    async def call(self, ep, method: str, buf: np.ndarray, tag: int) -> None:
        """`ep.send(buf)` or `ep.recv(buf)` on a ucxx Endpoint, with `tag` as it is; ucxx's error
        for the request raised here."""
        if ep.closed:
            raise self._closed_error("Endpoint closed")
        ep = ep._ep  # what ucxx's Endpoint.send/recv post the request on
        ep.raise_on_error()
        if method == "send":
            request = ep.tag_send(self._array(buf), self._tag(tag))
        else:
            request = ep.tag_recv(self._array(buf), self._tag(tag), self._tag_mask)
        if request.completed:  # an eager send
            request.check_error()
            return
        future = self.event_loop.create_future()
        self._pending[request] = future
        try:
            self.progress()
            await future
        except BaseException:  # cancelled, or the progress failed
            if not request.completed:
                self._orphans[request] = buf
            raise
        finally:
            self._pending.pop(request, None)

    def poke(self) -> None:
        """Progress in the loop's next turn, once however often poked: ucxx's own calls (an
        endpoint's close) may complete requests without an event on the descriptor."""
        if not self._poked:
            self._poked = True
            self.event_loop.call_soon(_poked, self._ref)

    def progress(self) -> None:
        """Progress the worker until it can be armed (ucp_worker_arm's contract: nothing left to
        progress before the loop waits on the descriptor again), completing finished requests; past
        ROUNDS_PER_TURN rounds, the rest in a later turn of the loop."""
        if not self._progress_rounds(ROUNDS_PER_TURN):
            self.poke()

    def _progress_rounds(self, rounds: int) -> bool:
        """True once the worker is armed."""
        worker = self.worker
        for _ in range(rounds):
            worker.progress()  # until UCX has nothing more to do right now
            if self._pending:
                for request in [r for r in self._pending if r.completed]:
                    future = self._pending.pop(request)
                    if future.done():
                        continue
                    try:
                        request.check_error()
                        future.set_result(None)
                    except Exception as e:
                        future.set_exception(e)
            if self._orphans:
                for request in [r for r in self._orphans if r.completed]:
                    del self._orphans[request]
            if worker.arm():
                return True
        return False


def _progress(ref: weakref.ref) -> None:
    progress = ref()
    if progress is not None and LoopProgress.running.get(progress.event_loop) is progress:
        progress.progress()


def _poked(ref: weakref.ref) -> None:
    progress = ref()
    if progress is not None:
        progress._poked = False
        _progress(ref)


def _backstop(ref: weakref.ref) -> None:
    progress = ref()
    if progress is not None and LoopProgress.running.get(progress.event_loop) is progress:
        # scheduled first, so that a progress that raises does not end the backstop
        progress._backstop = progress.event_loop.call_later(progress.BACKSTOP_S, _backstop, ref)
        progress.progress()


def install() -> None:
    """Make ucxx's "blocking" mode this one; ucxx.init() starts it for the running loop."""
    from ucxx._lib_async import application_context

    application_context.BlockingMode = LoopProgress
