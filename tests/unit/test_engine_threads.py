"""What an engine process's threads do besides the forward: one OpenMP team only, on the engine
thread, and a UCX progress thread that sleeps while there is nothing to progress. Each runs in a
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

async def main():
    transport = make_transport("ucx")
    async def echo(conn):
        pass
    await transport.listen(echo, "127.0.0.1")
    await asyncio.sleep(0.5)
    before = switches()
    await asyncio.sleep(2)
    woke = switches() - before
    await transport.close()
    print(json.dumps({"woke": woke}))

asyncio.run(main())
"""


def test_an_idle_ucx_worker_lets_the_cores_be():
    """ucxx's own progress thread waits at most 1 ms for an event: ~1,600 wake-ups in 2 idle s. Ours
    sleeps until there is one (a 100 ms backstop: ~20), and the loop and notifier wake rarely."""
    woke = run_script(IDLE_UCX)["woke"]
    assert woke < 300, woke
