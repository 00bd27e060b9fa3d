"""When `dejavu up` starts a dead service again (dejavu.cli.Restarts)."""

from dejavu.cli import Restarts


def test_a_service_killed_again_and_again_comes_back_ever_later_but_always():
    """A probe SIGKILLed the only token service 4 times within a minute: `dejavu up` left it dead
    for good, and every request after got a 503 (no token service registered) until a person
    restarted the cluster. Now the first 3 deaths in a row restart it at once, then after 1, 2,
    4 ... s, never more than 30 s, and never given up."""
    r = Restarts()
    delays = [r.delay("token-0", ran_s=5.0) for _ in range(10)]
    assert delays == [0, 0, 0, 1, 2, 4, 8, 16, 30, 30]
    assert not r.give_up("token-0", "token")
    assert r.delay("token-0", ran_s=Restarts.STABLE_S) == 0  # a long run ends the row
    assert r.row["token-0"] == 1
    assert r.delay("prompt-0", ran_s=1.0) == 0  # each service its own row


def test_a_gateway_that_dies_four_times_within_a_minute_is_given_up():
    """Without it nothing is served: `dejavu up` says so and exits rather than wait on it. Four
    deaths spread over more than a minute (an OOM killer now and then) are not a reason."""
    r = Restarts()
    for at in (0.0, 30.0, 61.0, 92.0):  # never 4 within 60 s
        r.delay("gateway-0", ran_s=25.0, now=at)
        assert not r.give_up("gateway-0", "gateway")
    r = Restarts()
    for at in (0.0, 1.0, 2.0):
        r.delay("gateway-0", ran_s=1.0, now=at)
        assert not r.give_up("gateway-0", "gateway")
    r.delay("gateway-0", ran_s=1.0, now=3.0)
    assert r.give_up("gateway-0", "gateway")


class Dying:
    """A service that dies as soon as it starts: a real process (`true`)."""

    def __init__(self, name: str, kind: str):
        import subprocess

        self.name, self.kind, self.proc = name, kind, subprocess.Popen(["true"])
        self.pid = self.proc.pid

    def describe_exit(self) -> str:
        return f"{self.name} (pid {self.pid}) exited"


class Supervised:
    """What `_watch` reads of a Cluster: its children, the dead ones, a respawn; no Redis. Its
    `stop_after`-th respawn sends this process the SIGTERM that ends the watch."""

    redis = None

    def __init__(self, *children: Dying, stop_after: int = 0):
        self.children, self.respawned, self.stop_after = list(children), [], stop_after

    def dead(self) -> list:
        return [c for c in self.children if c.proc.poll() is not None]

    def respawn(self, child: Dying) -> Dying:
        import os
        import signal
        import time

        new = Dying(child.name, child.kind)
        self.children[self.children.index(child)] = new
        self.respawned.append((child.name, time.monotonic()))
        if len(self.respawned) == self.stop_after:
            os.kill(os.getpid(), signal.SIGTERM)  # _watch's handler: it stops at its next turn
        return new


def watch(cluster: Supervised) -> int:
    """_watch(cluster), our signal handlers put back after; a timer's SIGTERM ends it in 30 s at most."""
    import os
    import signal
    import threading

    from dejavu.cli import _watch

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    timer = threading.Timer(30.0, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        return _watch(cluster)
    finally:
        timer.cancel()
        for s, h in handlers.items():
            signal.signal(s, h)
        for child in cluster.children:
            child.proc.wait()


def test_the_watch_starts_a_dying_service_again_after_its_delay_and_stops_on_sigterm(capsys):
    """`dejavu up`'s loop: a service that dies at once, again and again, is started 3 times at
    once, then after 1 s; SIGTERM ends the loop (exit 0)."""
    cluster = Supervised(Dying("token-0", "token"), stop_after=4)
    assert watch(cluster) == 0
    times = [t for _, t in cluster.respawned]
    assert len(times) == 4, times
    assert times[3] - times[2] >= 1.0, times  # the 4th death waited its 1 s
    assert "token-0 died 4 times in a row: restarting it in 1 s" in capsys.readouterr().err


def test_the_watch_stops_everything_when_the_gateway_keeps_dying(capsys):
    cluster = Supervised(Dying("gateway-0", "gateway"))
    assert watch(cluster) == 1
    assert len(cluster.respawned) == 3
    assert "the gateway died 4 times within a minute: stopping" in capsys.readouterr().err
