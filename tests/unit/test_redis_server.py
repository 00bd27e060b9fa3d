"""The embedded Redis of `dejavu up` and the tests (dejavu/redis_server.py), a real redis-server."""

from __future__ import annotations

import pytest

from dejavu.redis_server import RedisServer


def test_an_embedded_redis_on_a_taken_port_says_so():
    """Another Redis answering on the port is not ours: RedisServer waits for its own process
    (INFO's process_id), which exits, and says why (its log)."""
    first = RedisServer()
    try:
        with pytest.raises(RuntimeError, match="Address already in use"):
            RedisServer(port=first.port)
    finally:
        first.stop()


def test_servers_started_from_the_main_thread_end_with_their_starter():
    """A harness killed (SIGKILL: no cleanup runs), a test run or a benchmark, left its Redis and
    its clusters' services running; started from the main thread they now end with it. From
    another thread they cannot (the parent-death signal follows the thread that started them)."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    from dejavu.children import child_argv

    starter = subprocess.Popen([sys.executable, "-c", "import time; from dejavu.redis_server import RedisServer; "
                                "print(RedisServer().proc.pid, flush=True); time.sleep(600)"],
                               stdout=subprocess.PIPE, text=True)
    redis_pid = int(starter.stdout.readline())
    try:
        os.kill(starter.pid, signal.SIGKILL)
        starter.wait(10)
        deadline = time.monotonic() + 10
        while _running(redis_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(redis_pid), "the Redis of a killed starter was left running"
    finally:
        starter.stdout.close()
        if _running(redis_pid):
            os.kill(redis_pid, signal.SIGTERM)
    argv = ["/bin/true"]
    assert child_argv(argv, None) != argv and child_argv(argv, False) == argv
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.append(child_argv(argv, None)))
    thread.start()
    thread.join()
    assert elsewhere == [argv]


def _running(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie has: its parent is gone here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
