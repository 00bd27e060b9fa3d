"""`dejavu up` as a user runs it: it starts everything, prints the URL and its CPU placement, serves,
names a child that dies, and stops every child on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from dejavu import placement
from dejavu.redis_server import free_port


class Up:
    def __init__(self, model: str, port: int, cpu_placement: str = "auto", env: dict | None = None):
        self.cpu_placement = cpu_placement
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dejavu", "up", "--model", model, "--port", str(port), "--kv-transport", "tcp",
             "--max-seqs", "2", "--max-model-len", "256", "--cpu-placement", cpu_placement, "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if "ready in" in line:
                self.ready.set()

    def wait_ready(self, timeout: float = 180) -> None:
        if not self.ready.wait(timeout):
            self.proc.kill()
            pytest.fail("dejavu up not ready:\n" + "\n".join(self.lines[-30:]))

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def wait_exit(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def test_up_serves_and_stops_cleanly_on_sigterm(tiny_model_path, tmp_path):
    port = free_port()
    env = {"DEJAVU_CACHE_DIR": str(tmp_path)}  # where it says it runs: this test's alone
    up = Up(str(tiny_model_path), port, env=env)
    try:
        up.wait_ready()
        output = "\n".join(up.lines)
        assert f"http://127.0.0.1:{port}/v1" in output and "curl" in output
        children = up.children()
        kinds = " ".join(" ".join(c.cmdline()) for c in children)
        for module in ("redis-server", "gateway", "prompt_service", "token_service", "cache_store"):
            assert module in kinds
        lock = assert_placed(up, children)
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                          json={"prompt": "Hello", "max_tokens": 5, "temperature": 0})
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 5
        # `dejavu status` with no --redis-url finds the Redis of the one `dejavu up` running here
        status_env = {k: v for k, v in os.environ.items() if k != "DEJAVU_REDIS_URL"} | env
        status = subprocess.run([sys.executable, "-m", "dejavu", "status", "--json"], capture_output=True, text=True,
                                timeout=30, env=status_env)
        assert status.returncode == 0, status.stderr
        assert {"gateway", "prompt", "token", "cache_store"} <= {s["kind"] for s in json.loads(status.stdout)}
        up.proc.send_signal(signal.SIGTERM)
        assert up.wait_exit() == 0
        assert not list((tmp_path / "up").iterdir()), "its record was left behind"
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"children left running: {alive}"
        assert lock is None or not os.path.exists(os.path.dirname(lock)), "the turn lock's folder was left behind"
    finally:
        if up.proc.poll() is None:
            up.proc.kill()


def test_up_names_and_restarts_a_dead_service(tiny_model_path):
    """With the engines taking turns on the cores (whatever auto would pick on this host): the new
    token service takes turns with the prompt service through the same lock, and serves. Then
    `dejavu up` is SIGKILLed: every child ends with it."""
    port = free_port()
    up = Up(str(tiny_model_path), port, cpu_placement="turns")
    try:
        up.wait_ready()
        for module in ("token_service", "gateway"):
            victim = next(c for c in up.children() if c.cmdline()[-1] == module)
            os.kill(victim.pid, signal.SIGKILL)
            name = "token-0" if module == "token_service" else "gateway-0"
            wait_for_line(up, f"{name} (pid {victim.pid}) killed by signal SIGKILL")
            wait_for_line(up, f"restarting {name} (new pid")
        assert_placed(up, up.children())  # the new token service is placed as the old one was (same lock)
        deadline = time.monotonic() + 120  # the new gateway and token service serve again
        while True:
            try:
                resp = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                                  json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
                if resp.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "\n".join(up.lines[-20:])
            time.sleep(0.5)
        assert up.proc.poll() is None
        # `dejavu up` itself SIGKILLed (or OOM-killed): its children, the restarted ones too, end
        # with it, instead of serving on with nobody to restart them (found by killing processes)
        children = up.children()
        assert len(children) >= 5
        up.proc.kill()
        up.proc.wait(10)
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"children left running: {[' '.join(c.cmdline()) for c in alive]}"
    finally:
        if up.proc.poll() is None:
            up.proc.kill()


def assert_placed(up: Up, children: list[psutil.Process]) -> str | None:
    """The plan line is printed, and each engine runs on the cores and threads it names, taking
    turns through one lock file if the plan says so. -> that file, if any."""
    cores, why_not = placement.host_cores()
    plan = placement.plan(cores, prompt_services=1, token_services=1, mode=up.cpu_placement) if cores else {}
    line = f"[dejavu] CPU placement: {placement.describe(plan, cores) if cores else f'off ({why_not})'}"
    assert line in up.lines, "\n".join(up.lines[:5])
    locks = set()
    for module, name in (("prompt_service", "prompt-0"), ("token_service", "token-0")):
        engine = next(c for c in children if c.cmdline()[-1] == module)
        expected = list(plan[name].cores) if plan and plan[name].cores else sorted(os.sched_getaffinity(0))
        assert engine.cpu_affinity() == expected, f"{name}: {engine.cpu_affinity()} != {expected}"
        threads = str(plan[name].threads) if plan else os.environ.get("DEJAVU_THREADS")
        assert engine.environ().get("DEJAVU_THREADS") == threads
        locks.add(engine.environ().get("DEJAVU_CPU_TURNS"))
    if plan and plan["token-0"].turns:
        assert len(locks) == 1, locks  # one lock file for both engines
        lock = locks.pop()
        assert lock and os.path.exists(lock), lock
        return lock
    assert locks <= {None, ""}, locks  # not taking turns, even with DEJAVU_CPU_TURNS in our environment
    return None


def wait_for_line(up: Up, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in up.lines):
        assert time.monotonic() < deadline, f"no line with {text!r}:\n" + "\n".join(up.lines[-20:])
        time.sleep(0.2)


@pytest.mark.parametrize("args, message", [
    (["--max-seqs", "0"], "--max-seqs must be at least 1"),
    (["--max-model-len", "0"], "--max-model-len must be at least 16"),
    (["--block-size", "0"], "--block-size must be at least 1"),
    (["--port", "99999"], "--port must be in 0..65535"),
    # read off the model's config, before any process loads it (the tiny model: 3 layers, 256 B of KV per token and layer)
    (["--stages", "4"], "--stages 4: the model has 3 layers, and each stage needs one at least"),
    (["--prompt-stages", "5"], "--prompt-stages 5: the model has 3 layers"),
    (["--stages", "2", "--swap", "--kv-device-bytes", "1048575"], "give at least 1048576"),  # 2 x 64 blocks of 2 layers
    (["--kv-device-bytes", "786431"], "does not hold one sequence of --max-model-len 1024 for 3 layers in float32"),
    # what the services found only after loading the model: 40 s of retries and tracebacks (a probe), or "port in use"
    (["--redis-url", "redis://127.0.0.1:1/0"], "--redis-url redis://127.0.0.1:1/0: no Redis answered there within"),
    (["--redis-url", "http://127.0.0.1:6379"], "must start with redis://, rediss:// or unix://"),
    (["--host", "192.0.2.1"], "--host 192.0.2.1 is no address of this machine"),  # (TEST-NET-1: never ours)
])
def test_up_refuses_bad_options_before_starting_anything(tiny_model_path, args, message, monkeypatch, capsys):
    """`dejavu up`'s own code in this process, a cluster never made (a `dejavu up` process each took
    3-5 s, most of it importing torch to read the model's config; the command line's process and its
    exit status are test_up_says_when_its_port_is_taken's)."""
    from dejavu import cli, cluster

    def made(*args, **kwargs):
        raise AssertionError("dejavu up went on to start a cluster")

    monkeypatch.setattr(cluster.Cluster, "__init__", made)
    monkeypatch.setattr(cli, "REDIS_WAIT_S", 1.0)  # the wait is the same, shorter (10 s for a user)
    with pytest.raises(SystemExit) as exited:
        cli.main(["up", "--model", str(tiny_model_path), *args])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err, err


def test_up_says_when_its_port_is_taken(tiny_model_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "dejavu", "up", "--model", str(tiny_model_path), "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
