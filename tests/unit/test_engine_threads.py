"""What an engine process's threads do besides the forward: one OpenMP team only, on the engine
thread, and no UCX thread at all (the event loop progresses UCX). Each runs in a
process of its own: both set process-wide state (torch's thread counts, the ucxx context)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


TEAMS = """
import asyncio, json, sys, threading
import torch
from common.model import load_model
from engine.attention import Segment
from engine.kernels import paged_attention
from engine.runner import ModelRunner, teams_on_engine_threads_only

async def main():
    threads = teams_on_engine_threads_only(2)
    model = await asyncio.to_thread(load_model, sys.argv[1], 0, "float32")  # as the services load it
    runner = ModelRunner(model, block_size=4, threads=threads)
    pool = runner.new_pool(16)
    prompt = list(range(5, 25))
    await runner.run(runner.forward, [Segment(prompt, 0, list(range(5)))], pool)  # a prefill, then a decode step
    await runner.run(runner.forward, [Segment([7], len(prompt), list(range(6)))], pool)
    counts = {"engine": await runner.run(torch.get_num_threads), "main": torch.get_num_threads(),
              "loader": await asyncio.to_thread(torch.get_num_threads)}
    later = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start(); t.join()
    print(json.dumps(dict(counts, later=later[0], kernels=paged_attention() is not None, llama=runner.llama is not None)))

asyncio.run(main())
"""


def test_only_the_engine_thread_computes_with_a_team(tiny_model_path):
    """The engine thread keeps its 2 threads through our kernels' calls (their own at::parallel_for
    once set it back to torch's last count, 1); the loop's thread, the loader's and any later one
    compute with one, so the process holds one team (engine/runner.py)."""
    counts = run_script(TEAMS, str(tiny_model_path))
    assert counts["llama"] and counts["kernels"], counts  # the kernels ran in the forwards above
    assert counts["engine"] == 2, counts
    assert counts["main"] == counts["loader"] == counts["later"] == 1, counts


IDLE_UCX = """
import asyncio, json, os, time
from common.kv import make_transport

def switches():
    total = 0
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/status") as fh:
            total += sum(int(line.split()[1]) for line in fh if line.startswith("voluntary_ctxt_switches"))
    return total

def comm(tid):
    with open(f"/proc/self/task/{tid}/comm") as fh:
        return fh.read().strip()

async def main():
    await asyncio.to_thread(time.sleep, 0)  # asyncio's executor thread (shm.py makes rings on it)
    threads = set(os.listdir("/proc/self/task"))
    server, client = make_transport("ucx"), make_transport("ucx")
    async def echo(conn):
        while True:
            header, payload = await conn.recv()
            await conn.send(header, payload)
    address = await server.listen(echo, "127.0.0.1")
    conn = await client.connect(address)
    for n in (0, 100, 100_000):  # in the head, and a message of its own
        await conn.send(b"frame", bytes(n))
        header, payload = await conn.recv()
        assert header == b"frame" and len(payload) == n
    threads = [comm(t) for t in set(os.listdir("/proc/self/task")) - threads]
    from common.kv.ucx_progress import LoopProgress
    progressed = len(LoopProgress.running)
    await asyncio.sleep(0.5)
    before, cpu = switches(), time.process_time()
    await asyncio.sleep(2)  # the server's recv stays posted all along
    woke, cpu = switches() - before, time.process_time() - cpu
    await conn.close()
    await client.close()
    await server.close()
    print(json.dumps({"woke": woke, "cpu_s": cpu, "threads": threads, "progressed": progressed,
                      "after_close": len(LoopProgress.running)}))

asyncio.run(main())
"""


def test_ucx_runs_no_thread_of_its_own_and_lets_the_cores_be():
    """The event loop progresses UCX (common/kv/ucx_progress.py): ucxx's "thread" mode would add a
    progress thread and a notifier thread, and its progress thread waits at most 1 ms for an event
    (~1,600 wake-ups in 2 idle s); ucxx's own polling of a request from the loop would burn a core
    without sleeping. Idle, with a recv posted, the process wakes for the 100 ms backstop (~20) and
    little else. Both ends share one process here; tests/unit/test_transport.py's two-process
    cases cover a wake-up from another process."""
    out = run_script(IDLE_UCX)
    assert out["threads"] == ["async"], out  # UCX's own, for its sockets' events
    assert out["progressed"] == 1 and out["after_close"] == 0, out
    assert out["woke"] < 100 and out["cpu_s"] < 0.2, out
