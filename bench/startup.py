"""How long a service takes to start: spawned to ready (its DEJAVU_READY line), one token service
alone and a whole disaggregated cluster (prompt, token, cache store, gateway: `dejavu up`'s
topology), optionally against another source tree in the same run.

Step by step:
1. One Redis server for every measurement.
2. Each measurement is a fresh interpreter in the tree measured (this one, or --baseline-tree, e.g.
   `git worktree add /tmp/before HEAD~1`): it spawns what it times, waits for ready, stops it.
   "token": `python -m token_service`, spawn to its ready line, and its resident memory then
   (VmRSS, and VmHWM: the peak so far, the model's load included). "cluster": dejavu.cluster.Cluster
   with 1 prompt service, 1 token service and 1 cache store, from start() to every service ready.
3. One round unrecorded first (a tree's first start may build its CPU kernels, ~100 s, and reads
   the weights from disk), then --repeats rounds, the trees alternating; medians [min-max].
The model is converted once before (the bundled GGUF's first use is a one-time ~40 s). Progress
goes to stderr. Nothing is asserted; figures go to stdout and, with --out, to JSON (no plot).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import bench_parser, fmt, log, spread, write_json

HERE = Path(__file__).resolve().parents[1]

TOKEN = r"""
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen([sys.executable, "-m", "token_service"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, env={**os.environ, "DEJAVU_SERVICE_ID": "startup-%d" % os.getpid(), "DEJAVU_PORT": "0"})
for line in proc.stdout:
    if line.startswith("DEJAVU_READY"):
        ready_s = time.perf_counter() - start
        status = dict(l.split(":", 1) for l in open("/proc/%d/status" % proc.pid) if ":" in l)
        mib = lambda key: int(status[key].split()[0]) / 1024 if key in status else None
        print(json.dumps({"ready_s": ready_s, "rss_mib": mib("VmRSS"), "peak_rss_mib": mib("VmHWM")}), flush=True)
        break
proc.terminate()
proc.wait(30)
"""

CLUSTER = r"""
import json, os, time
from dejavu.cluster import Cluster
cluster = Cluster(os.environ["DEJAVU_MODEL"], port=0, redis_url=os.environ["DEJAVU_REDIS_URL"], echo_logs=False)
start = time.perf_counter()
cluster.start()
print(json.dumps({"ready_s": time.perf_counter() - start}), flush=True)
cluster.stop()
"""


def measure(tree: Path, what: str, env: dict) -> dict:
    code = TOKEN if what == "token" else CLUSTER
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env={**env, "PYTHONPATH": str(tree)},
                         capture_output=True, text=True, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{what} in {tree} did not start:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])  # ready_s; a token service's rss_mib and peak_rss_mib (VmRSS, VmHWM at ready)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("startup", __doc__)
    p.add_argument("--model", default="smollm2", help="the bundled model or a Hugging Face folder")
    p.add_argument("--repeats", type=int, default=5, help="recorded rounds, after the unrecorded one")
    p.add_argument("--what", default="token,cluster", help="token, cluster or both (comma-separated)")
    p.add_argument("--baseline-tree", help="another checkout to time in the same rounds (e.g. a worktree of HEAD~1)")
    p.add_argument("--out", metavar="FILE.json", help="write the figures as JSON")
    args = p.parse_args(argv)

    from common.model import resolve_model_path
    from dejavu.redis_server import RedisServer

    model = str(resolve_model_path(args.model, progress=log))
    trees = {"this tree": HERE}
    if args.baseline_tree:
        trees["baseline"] = Path(args.baseline_tree).resolve()
    what = [w for w in args.what.split(",") if w]
    redis = RedisServer()
    env = {**os.environ, "DEJAVU_MODEL": model, "DEJAVU_REDIS_URL": redis.url, "DEJAVU_HOST": "127.0.0.1"}
    times: dict[str, dict[str, list[float]]] = {w: {t: [] for t in trees} for w in what}
    memory: dict[str, dict[str, list[float]]] = {t: {"rss_mib": [], "peak_rss_mib": []} for t in trees}
    try:
        for w in what:
            for name, tree in trees.items():
                log(f"warm-up: {w}, {name}: {measure(tree, w, env)['ready_s']:.2f} s (not recorded)")
        for r in range(args.repeats):
            order = list(trees.items()) if r % 2 == 0 else list(reversed(trees.items()))
            for w in what:
                for name, tree in order:
                    m = measure(tree, w, env)
                    times[w][name].append(m["ready_s"])
                    for key in memory[name]:
                        if m.get(key) is not None:
                            memory[name][key].append(m[key])
                    log(f"round {r + 1}/{args.repeats}: {w}, {name}: {times[w][name][-1]:.2f} s")
    finally:
        redis.stop()
    summary = {w: {name: spread(v) for name, v in by_tree.items()} for w, by_tree in times.items()}
    print(f"\nspawned to ready, s, median [min-max] of {args.repeats} ({model}):")
    for w, by_tree in summary.items():
        cells = ", ".join(f"{name} {fmt(s, 2)}" for name, s in by_tree.items())
        ratio = (f"; baseline / this tree {by_tree['baseline']['median'] / by_tree['this tree']['median']:.2f}x"
                 if "baseline" in by_tree else "")
        print(f"  {w}: {cells}{ratio}")
    for name, by_key in memory.items():
        if by_key["rss_mib"]:
            summary.setdefault("token_memory_mib", {})[name] = {key: spread(v) for key, v in by_key.items()}
            print(f"  a token service's memory at ready, {name}: RSS {fmt(summary['token_memory_mib'][name]['rss_mib'], 0)} "
                  f"MiB, peak {fmt(summary['token_memory_mib'][name]['peak_rss_mib'], 0)} MiB")
    commits = {name: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip()
               for name, tree in trees.items()}  # a working tree's changes after its HEAD are not in it
    write_json(args.out or "", summary, config={**vars(args), "trees": {k: str(v) for k, v in trees.items()}, "commits": commits},
               times=times, memory=memory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
