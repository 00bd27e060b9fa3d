"""Starting and stopping a whole cluster as separate local processes: Redis (embedded unless a
URL is given), token services, prompt services, cache stores and the gateway.

Used by `dejavu up`, by the cluster tests and by the benchmarks. Each child is `python -m
<service>` with its settings in DEJAVU_* variables; it prints `DEJAVU_READY <kind> <url>` on stdout
when it serves. Children's logs go to our stderr (and the last lines are kept, to say why a child
died). `stop()` ends only the processes it started, by PID: SIGTERM, then SIGKILL after a grace.
"""

from __future__ import annotations

import collections
import fcntl
import itertools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from common.protocol import CLUSTER_TOKEN_HEADER
from common.settings import STOP_GRACE_S
from dejavu.children import child_argv
from dejavu.placement import Placement
from dejavu.redis_server import RedisServer, free_port

MODULES = {"token": "token_service", "stage": "token_service", "prompt": "prompt_service",
           "prompt_stage": "prompt_service", "cache_store": "cache_store", "gateway": "gateway"}


@dataclass
class Child:
    name: str                  # e.g. "token-0"
    kind: str                  # token | stage | prompt | prompt_stage | cache_store | gateway
    proc: subprocess.Popen
    url: str = ""
    overrides: dict = field(default_factory=dict)  # its own DEJAVU_* settings (a stage's index), kept for a respawn
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=30))
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def describe_exit(self) -> str:
        code = self.proc.returncode
        how = f"killed by signal {signal.Signals(-code).name}" if code and code < 0 else f"exited with code {code}"
        last = "\n    ".join(list(self.tail)[-12:]) or "(no output)"
        return f"{self.name} (pid {self.pid}) {how}; its last lines:\n    {last}"


class ClusterError(RuntimeError):
    pass


class Cluster:
    def __init__(self, model: str = "smollm2", port: int = 8000, prompt_services: int = 1, token_services: int = 1,
                 cache_stores: int = 1, redis_url: str | None = None, env: dict[str, str] | None = None,
                 echo_logs: bool = True, host: str = "127.0.0.1", placement: dict[str, Placement] | None = None,
                 stages: int = 1, prompt_stages: int = 1, end_with_us: bool | None = None):
        self.model, self.port, self.host = model, port, host
        # children (and the embedded Redis) end when this process does (`dejavu up`): they must then be
        # started, and restarted, from the main thread (dejavu.children); None: those started from it
        self.end_with_us = end_with_us
        self.stages = stages  # each token service a pipeline of this many processes (token_service/pipeline.py)
        self.prompt_stages = prompt_stages  # and each prompt service (prompt_service/pipeline.py)
        self.placement = placement or {}  # child name -> cores and threads (dejavu.placement.plan); {} = off
        # engines that take turns on the cores share one lock file (engine/turns.py), in a folder
        # ours to remove; we hold a shared lock on the folder so that /tmp cleaners pass it by
        # (systemd-tmpfiles skips a locked one): a lock file removed under running engines would
        # let a respawned one take turns on a file of its own
        self.turns_dir, self._turns_dir_fd = None, None
        if any(p.turns for p in self.placement.values()):
            self.turns_dir = tempfile.mkdtemp(prefix="dejavu-turns-")
            self._turns_dir_fd = os.open(self.turns_dir, os.O_RDONLY)
            fcntl.flock(self._turns_dir_fd, fcntl.LOCK_SH)
        self.counts = {"token": token_services, "prompt": prompt_services, "cache_store": cache_stores, "gateway": 1}
        self.redis_url, self.env, self.echo_logs = redis_url, dict(env or {}), echo_logs
        # one secret for the cluster's internal endpoints and KV links (common/kv/auth.py): the
        # caller's, or a fresh one; "" turns internal authentication off
        self.env.setdefault("DEJAVU_CLUSTER_TOKEN", os.environ.get("DEJAVU_CLUSTER_TOKEN") or secrets.token_urlsafe(24))
        self.redis: RedisServer | None = None
        self.tag = secrets.token_hex(2)  # in service ids: two clusters of one process on one Redis stay apart
        self.spawned = itertools.count()  # and a number per process started: a restarted service gets a new id
        self.children: list[Child] = []

    @property
    def url(self) -> str:
        return self.gateway.url

    @property
    def internal_headers(self) -> dict[str, str]:
        """What a call to an internal endpoint needs (the cluster token), for tests and operators."""
        token = self.env["DEJAVU_CLUSTER_TOKEN"]
        return {CLUSTER_TOKEN_HEADER: token} if token else {}

    @property
    def gateway(self) -> Child:
        return next(c for c in self.children if c.kind == "gateway")

    def of(self, kind: str) -> list[Child]:
        return [c for c in self.children if c.kind == kind]

    def start(self, timeout: float = 300.0) -> "Cluster":
        try:
            if self.redis_url is None:
                self.redis = RedisServer(end_with_us=self.end_with_us)
                self.redis_url = self.redis.url
            for kind, count in self.counts.items():
                for i in range(count):
                    if kind == "token" and self.stages > 1:
                        self.spawn_pipeline(f"token-{i}")
                    elif kind == "prompt" and self.prompt_stages > 1:
                        self.spawn_pipeline(f"prompt-{i}", "prompt", self.prompt_stages)
                    else:
                        self.spawn(kind, f"{kind}-{i}")
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def spawn_pipeline(self, name: str, kind: str = "token", stages: int | None = None) -> list[Child]:
        """A token (prompt) service of `stages` processes: its stage workers ("token-0-stage-1", ...)
        and its head ("token-0", the service the gateway sees), each an engine of the CPU placement."""
        stages = stages or self.stages
        pipeline = {"DEJAVU_STAGES": str(stages), "DEJAVU_PIPELINE": f"{name}-{self.tag}"}
        worker = "stage" if kind == "token" else "prompt_stage"
        return [self.spawn(worker, f"{name}-stage-{k}", **pipeline, DEJAVU_STAGE=str(k)) for k in range(1, stages)] + [
            self.spawn(kind, name, **pipeline, DEJAVU_STAGE="0")]

    def spawn(self, kind: str, name: str, **overrides: str) -> Child:
        """Start one service; a respawn under the same name gets the same placement."""
        place = self.placement.get(name)
        env = {**os.environ, **self.env, "DEJAVU_REDIS_URL": self.redis_url, "DEJAVU_MODEL": self.model,
               "DEJAVU_HOST": self.host, "DEJAVU_SERVICE_ID": f"{name}-{os.getpid()}-{self.tag}{next(self.spawned)}",
               "PYTHONUNBUFFERED": "1", **({"DEJAVU_THREADS": str(place.threads)} if place else {}),
               **({"DEJAVU_CPU_TURNS": os.path.join(self.turns_dir, "cpu.lock") if place.turns else ""} if place else {}),
               **overrides}
        env.setdefault("DEJAVU_PORT", str(self.port) if kind == "gateway" else "0")
        argv = [sys.executable, "-m", MODULES[kind]]
        proc = subprocess.Popen(child_argv(argv, self.end_with_us), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        if place and place.cores:
            _pin(proc.pid, place.cores)
        child = Child(name, kind, proc, overrides=overrides)
        threading.Thread(target=self._pump, args=(child,), daemon=True).start()
        self.children.append(child)
        return child

    def _pump(self, child: Child) -> None:
        for raw in child.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line.startswith("DEJAVU_READY "):
                child.url = line.split()[2]
                child.ready.set()
                continue
            child.tail.append(line)
            if self.echo_logs:
                try:
                    print(line, file=sys.stderr, flush=True)
                except OSError:  # our stderr is gone; keep draining the child's pipe
                    self.echo_logs = False

    def wait_ready(self, timeout: float, children: list[Child] | None = None) -> None:
        deadline = time.monotonic() + timeout
        for child in children or self.children:
            while not child.ready.wait(0.2):
                if child.proc.poll() is not None:
                    time.sleep(0.2)  # let the pump catch the last lines
                    raise ClusterError("a service failed to start: " + child.describe_exit())
                if time.monotonic() > deadline:
                    raise ClusterError(f"{child.name} not ready after {timeout:.0f} s")

    def respawn(self, child: Child) -> Child:
        """Start a new process in a dead child's place (same name and kind, a new service id)."""
        new = self.spawn(child.kind, child.name, **child.overrides)
        self.children.remove(new)
        self.children[self.children.index(child)] = new
        return new

    def restart_redis(self) -> None:
        """The embedded Redis died: start it again, empty, on the same port (services re-register)."""
        self.redis = RedisServer(self.redis.port, end_with_us=self.end_with_us)

    def dead(self) -> list[Child]:
        return [c for c in self.children if c.proc.poll() is not None]

    def kill(self, child: Child, sig: int = signal.SIGKILL) -> None:
        """Fault injection: signal one child we started."""
        child.proc.send_signal(sig)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL past `grace`: the gateways first, so that the requests they have in
        flight finish (or end with an error that says so, past their --stop-grace-s) while the
        engines still serve them, then the rest."""
        gateways = self.of("gateway")
        try:  # a gateway's own grace, and a moment for its last errors and aborts, before its SIGKILL
            gateway_grace = float({**os.environ, **self.env}.get("DEJAVU_STOP_GRACE_S", STOP_GRACE_S)) + 3
        except ValueError:
            gateway_grace = grace  # (the gateway refused it at start)
        rest = [c for c in self.children if c not in gateways]
        for group, wait_s in ((gateways, max(grace, gateway_grace)), (rest, grace)):
            for child in group:
                if child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + wait_s
            for child in group:
                try:
                    child.proc.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait()
        if self.redis:
            self.redis.stop()
        if self.turns_dir:
            os.close(self._turns_dir_fd)
            shutil.rmtree(self.turns_dir, ignore_errors=True)
            self.turns_dir = None

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _pin(pid: int, cores: tuple[int, ...]) -> None:
    """Pin a child we just started. Done from here after Popen, not in a preexec_fn: a preexec_fn
    runs Python between fork and exec, which is unsafe while our log-pump threads run (the docs
    warn it can deadlock). Setting it now is in time: Popen returns once the child has exec'd
    Python, which is then still single-threaded, starting up for tens of milliseconds before it
    imports anything; the threads it starts later (torch's OpenMP team) inherit the mask."""
    try:
        os.sched_setaffinity(pid, cores)
    except ProcessLookupError:  # it died at once; wait_ready says why
        pass


__all__ = ["Cluster", "ClusterError", "free_port"]
