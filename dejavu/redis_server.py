"""An embedded Redis server: a real `redis-server` binary on a free loopback port, no persistence."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

from dejavu.children import child_argv


class RedisNotInstalled(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, port: int = 0, end_with_us: bool | None = None):
        """`end_with_us`: it ends when this process does (dejavu.children.child_argv)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisNotInstalled("redis-server is not installed: `apt-get install -y redis-server` "
                                    "(or pass --redis-url to use a running Redis)")
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="dejavu-redis-")
        # its log to a file, not a pipe no one reads (a full pipe would stall Redis); its own session,
        # so that a Ctrl-C at `dejavu up` reaches only `dejavu up`, which stops Redis after the
        # services (they deregister on the way out)
        self.log = os.path.join(self.dir, "redis.log")
        with open(self.log, "ab") as log:  # its start-up errors (a config it refuses) come on stderr; both append
            argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--dir", self.dir, "--protected-mode", "yes", "--loglevel", "warning", "--logfile", self.log]
            self.proc = subprocess.Popen(child_argv(argv, end_with_us), stdout=subprocess.DEVNULL, stderr=log,
                                         start_new_session=True)
        self._wait_ready()

    def _log_tail(self) -> str:
        try:
            with open(self.log, "rb") as f:
                return f.read().decode(errors="replace")[-500:]
        except OSError:
            return ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                why = self._log_tail()
                self.stop()  # its folder
                raise RuntimeError(f"redis-server exited ({self.proc.returncode}): {why}")
            try:
                if self._answering_pid() == self.proc.pid:
                    return
                # another Redis answers on this port (ours will exit: the port is taken)
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        why = self._log_tail()
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout:.0f} s: {why}")

    def _answering_pid(self) -> int:
        """The pid of the Redis that answers on our port (its INFO server), not just any PONG."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock, sock.makefile("rb") as f:
            sock.sendall(b"INFO server\r\n")
            head = f.readline()
            if not head.startswith(b"$"):
                raise ValueError(f"not a Redis answer: {head[:40]!r}")
            text = f.read(int(head[1:]))
        for line in text.decode(errors="replace").splitlines():
            if line.startswith("process_id:"):
                return int(line.split(":", 1)[1])
        raise ValueError("no process_id in INFO server")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
