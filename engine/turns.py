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
killed engine never leaves the others waiting. A stopped (SIGSTOP) or hung one that holds the turn
does, until it resumes; the turn-wait counter below then grows on the others.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager

from prometheus_client import Counter

TURN_WAIT = Counter("dejavu_engine_cpu_turn_wait_seconds", "time forwards waited for their turn on the host's cores "
                    "(--cpu-placement turns)")
TURNS = Counter("dejavu_engine_cpu_turns", "forwards run in a turn on the host's cores (--cpu-placement turns)")


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

    @contextmanager
    def hold(self):
        """Blocks the calling thread until this process has the turn; ends it on exit."""
        start = time.perf_counter()
        fcntl.flock(self.queue, fcntl.LOCK_EX)
        try:
            fcntl.flock(self.turn, fcntl.LOCK_EX)
        finally:
            fcntl.flock(self.queue, fcntl.LOCK_UN)
        TURN_WAIT.inc(time.perf_counter() - start)
        TURNS.inc()
        try:
            yield
        finally:
            fcntl.flock(self.turn, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.turn)
        os.close(self.queue)
