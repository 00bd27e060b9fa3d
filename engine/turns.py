"""Turns: the engine processes of one CPU host take turns on all of its cores, a forward at a time.

Two engines on one host (a prompt and a token service) either split the cores (each pinned to a
slice: a prefill then runs on half the cores even while the decode has nothing to do) or share
them (each runs an OpenMP team over every core: when both compute, each team's threads spin at
barriers while the other team holds their cores). Taking turns keeps every core on one team at a
time, as one colocated process alternates its prefill chunks and decode steps.

A turn is an exclusive flock(2) on a file every engine of the host opens (dejavu up makes one per
cluster; dejavu/placement.py says when), and a turn is one forward: a decode step, or a prompt
service's forward, which computes at most TURN_TOKENS prompt tokens then (prompt_service/engine.py).
Two engines alternate strictly: a process takes the queue lock (the file's ".queue" beside it),
then the turn, then lets the queue go, so one that has just ended its turn waits behind one already
waiting instead of taking the turn straight back (back-to-back decode steps do not starve a
prefill, nor the other way round). With three or more, flock(2) wakes waiters in no set order:
each still gets turns, in no promised order. The kernel drops a process's locks when it dies: a
killed engine never leaves the others waiting.

A stopped one (SIGSTOP, a debugger) keeps its lock, and once froze every engine of the host: the
failure contract says a hung token service costs its streams a pause, but the other token service
that should resume them could not take a turn. So the holder writes its pid into the turn file, a
waiter looks at it every CHECK_S, and while the holder is stopped the waiter computes without the
turn, as it does while the queue's holder is stopped (a waiter stopped while it waits: every other
waiter queues behind it). SKIPPED counts those forwards; the cores are shared again meanwhile, as
without turns. The blocking wait itself runs on a helper thread, so the engine thread can give up
on it; an acquisition given up on ends its turn as soon as it gets it. A holder that is not
stopped is waited for however long its forward takes (a big model's prefill chunk may take seconds).
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import struct
import threading
import time
from contextlib import contextmanager

from prometheus_client import Counter

log = logging.getLogger(__name__)

CHECK_S = 0.5  # a waiter looks at whether the turn's or the queue's holder is stopped this often
PID = struct.Struct("<q")  # the holder's pid at the start of the turn file, and of the queue file (0: none)

TURN_WAIT = Counter("dejavu_engine_cpu_turn_wait_seconds", "time forwards waited for their turn on the host's cores "
                    "(--cpu-placement turns)")
TURNS = Counter("dejavu_engine_cpu_turns", "forwards run in a turn on the host's cores (--cpu-placement turns)")
SKIPPED = Counter("dejavu_engine_cpu_turns_skipped", "forwards run without a turn because its holder was stopped "
                  "(SIGSTOP): the host's cores shared meanwhile")


class Turns:
    def __init__(self, path: str):
        fds = []
        try:
            for name in (path, path + ".queue"):
                fds.append(os.open(name, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise OSError(exc.errno, f"--cpu-turns / DEJAVU_CPU_TURNS {path}: cannot open the host's turn lock: "
                          f"{exc.strerror}") from exc
        self.turn, self.queue = fds
        self._mu = threading.Lock()
        self._event: threading.Event | None = None  # the acquisition in flight on the helper thread
        self._abandoned = False  # its waiter went on without it: it ends the turn once it has it
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # acquisitions for the helper thread (None: stop)
        # a daemon: blocked on a stopped holder's lock, it must not keep the process from exiting
        threading.Thread(target=self._serve, name="cpu-turns", daemon=True).start()
        self._warned: int | None = None  # the stopped holder last warned about

    @contextmanager
    def hold(self):
        """Blocks the calling thread until this process has the turn, or its holder is stopped;
        ends the turn (if it had it) on exit."""
        start = time.perf_counter()
        with self._mu:  # an acquisition given up on may still wait on the helper thread: never race it
            in_flight = self._event is not None  # (its flock and ours are one owner: it would end our turn)
        got = (not in_flight and self._try()) or self._wait()
        TURN_WAIT.inc(time.perf_counter() - start)
        (TURNS if got else SKIPPED).inc()
        try:
            yield
        finally:
            if got:
                self._release()

    def _try(self) -> bool:
        """The turn at once, if nobody holds it nor waits for it."""
        try:
            fcntl.flock(self.queue, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            fcntl.flock(self.turn, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            fcntl.flock(self.queue, fcntl.LOCK_UN)
        os.pwrite(self.turn, PID.pack(os.getpid()), 0)
        return True

    def _wait(self) -> bool:
        """True once the helper thread has the turn for us; False if its holder is stopped."""
        with self._mu:
            if self._event is None:
                self._event, self._abandoned = threading.Event(), False
                self._jobs.put(self._event)
            else:  # one given up on earlier is still waiting: it is ours again
                self._abandoned = False
            event = self._event
        while True:  # the turn's holder, or the queue's (a stopped waiter blocks everyone behind it)
            holder = next((pid for pid in (self._holder(self.turn), self._holder(self.queue)) if pid and _stopped(pid)), 0)
            if holder:
                with self._mu:
                    if not event.is_set():
                        self._abandoned = True
                        if self._warned != holder:
                            log.warning("the host's CPU turn is held by process %d, which is stopped: computing "
                                        "without the turn until it resumes or ends", holder)
                            self._warned = holder
                        return False
            if event.wait(CHECK_S):
                with self._mu:
                    self._event = None
                return True

    def _serve(self) -> None:
        while (event := self._jobs.get()) is not None:
            self._acquire(event)

    def _acquire(self, event: threading.Event) -> None:
        """On the helper thread: queue, turn, let the queue go (see the module docstring)."""
        fcntl.flock(self.queue, fcntl.LOCK_EX)
        try:
            os.pwrite(self.queue, PID.pack(os.getpid()), 0)
            fcntl.flock(self.turn, fcntl.LOCK_EX)
        finally:
            os.pwrite(self.queue, PID.pack(0), 0)
            fcntl.flock(self.queue, fcntl.LOCK_UN)
        with self._mu:
            if self._abandoned:  # its waiter went on without it: end the turn at once
                self._event, self._abandoned = None, False
                fcntl.flock(self.turn, fcntl.LOCK_UN)
                return
            os.pwrite(self.turn, PID.pack(os.getpid()), 0)
            self._warned = None
            event.set()

    def _release(self) -> None:
        os.pwrite(self.turn, PID.pack(0), 0)
        fcntl.flock(self.turn, fcntl.LOCK_UN)

    @staticmethod
    def _holder(fd: int) -> int:
        data = os.pread(fd, PID.size, 0)
        return PID.unpack(data)[0] if len(data) == PID.size else 0

    def close(self) -> None:
        self._jobs.put(None)
        os.close(self.turn)
        os.close(self.queue)


def _stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (SIGSTOP, or by a tracer): its state in /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:  # gone: the kernel has dropped its lock, or will in a moment
        return False
    fields = stat[stat.rfind(b")") + 2:].split()
    return bool(fields) and fields[0] in (b"T", b"t")
