"""engine/turns.py: engines of one host take turns on its cores. Real processes on a real lock file:
a forward waits while another process has the turn and runs once that process is killed (the
kernel drops its locks), and a process that ends its turn waits behind one already waiting."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from engine.attention import Segment
from engine.runner import ModelRunner
from engine.turns import Turns

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def other_engine(path: str, then: str) -> subprocess.Popen:
    """Another process of the host: takes a turn, says so on stdout, then runs `then` within it."""
    script = textwrap.dedent(f"""
        import sys, time
        from engine.turns import Turns
        with Turns({path!r}).hold():
            print("in turn", flush=True)
            {then}
    """)
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)


def wait_blocked(pid: int, timeout: float = 30) -> None:
    """Until process `pid` is blocked on a flock, as /proc/locks shows a waiter ("->")."""
    deadline = time.monotonic() + timeout
    while not any(line.split()[1:3] == ["->", "FLOCK"] and line.split()[5] == str(pid)
                  for line in open("/proc/locks")):
        assert time.monotonic() < deadline, f"process {pid} never waited for the turn"
        time.sleep(0.01)


def test_a_forward_waits_for_the_turn_and_gets_it_when_its_holder_is_killed(tiny_oracle, tmp_path):
    path = str(tmp_path / "cpu.lock")
    runner = ModelRunner(tiny_oracle.model, block_size=4, turns=path)
    holder = other_engine(path, "time.sleep(300)")
    try:
        assert holder.stdout.readline().strip() == "in turn"

        async def forward_while_held():
            task = asyncio.ensure_future(runner.run(runner.forward, [Segment([1, 2, 3])]))
            done, _ = await asyncio.wait([task], timeout=1.0)
            assert not done, "the forward ran while another process had the turn"
            os.kill(holder.pid, signal.SIGKILL)  # no unlock: the kernel drops a dead process's locks
            return await asyncio.wait_for(task, 30)

        logits = asyncio.run(forward_while_held())
        assert logits.shape == (1, runner.vocab_size)
    finally:
        holder.kill()
        holder.wait()


def test_ending_a_turn_lets_a_waiting_process_go_first(tmp_path):
    path, marker = str(tmp_path / "cpu.lock"), tmp_path / "other-had-a-turn"
    turns = Turns(path)
    with turns.hold():
        other = other_engine(path, f"open({str(marker)!r}, 'w').close()")
        wait_blocked(other.pid)
    with turns.hold():  # straight back: the turn goes to the waiting process first
        assert marker.exists()
    assert other.wait(30) == 0
    turns.close()


def test_an_unusable_lock_path_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="cannot open the host's turn lock"):
        Turns(str(tmp_path / "missing-dir" / "cpu.lock"))


def test_a_stopped_holder_does_not_freeze_the_others(tmp_path):
    """A holder stopped with SIGSTOP keeps its flock: the others compute without the turn (counted)
    instead of waiting until it resumes, at once after the first time; once it has resumed and ended
    its turn, turns are taken again."""
    from prometheus_client import REGISTRY

    path = str(tmp_path / "cpu.lock")
    turns = Turns(path)
    skipped = lambda: REGISTRY.get_sample_value("dejavu_engine_cpu_turns_skipped_total") or 0.0  # noqa: E731
    before = skipped()
    holder = other_engine(path, "time.sleep(3)")
    try:
        assert holder.stdout.readline().strip() == "in turn"
        os.kill(holder.pid, signal.SIGSTOP)
        for _ in range(2):  # the first waits a check or so; the second sees the stopped holder at once
            done = threading.Event()
            threading.Thread(target=lambda: (turns.hold().__enter__(), done.set()), daemon=True).start()
            assert done.wait(30), "a stopped holder froze the turn"
        assert skipped() == before + 2
        os.kill(holder.pid, signal.SIGCONT)
        assert holder.wait(30) == 0  # it ends its sleep, then its turn
        with turns.hold():  # the turn again: this process holds the lock now
            assert any(line.split()[1:4] == ["FLOCK", "ADVISORY", "WRITE"] and line.split()[4] == str(os.getpid())
                       for line in open("/proc/locks"))
        assert skipped() == before + 2
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
            holder.kill()
            holder.wait()
        turns.close()


def test_a_stopped_waiter_does_not_freeze_the_others(tmp_path):
    """A process stopped while it waits for the turn holds the queue: once the turn is free, the
    others go on without waiting behind it."""
    path = str(tmp_path / "cpu.lock")
    holder = other_engine(path, "time.sleep(1)")
    waiter = None
    turns = Turns(path)
    try:
        assert holder.stdout.readline().strip() == "in turn"
        waiter = other_engine(path, "pass")
        wait_blocked(waiter.pid)  # it holds the queue, waiting for the turn
        os.kill(waiter.pid, signal.SIGSTOP)
        assert holder.wait(30) == 0  # the turn is free; the stopped waiter still holds the queue
        done = threading.Event()
        threading.Thread(target=lambda: (turns.hold().__enter__(), done.set()), daemon=True).start()
        assert done.wait(30), "a stopped waiter froze the queue"
        os.kill(waiter.pid, signal.SIGCONT)
        assert waiter.wait(30) == 0 and waiter.stdout.readline().strip() == "in turn"
    finally:
        for proc in (holder, waiter):
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait()
        turns.close()
