"""Overload: far more clients than KV room. Requests that find none wait at the gateway in arrival
order (or get a 429 with Retry-After past --max-queued-requests), so the token service only ever
runs its --max-seqs sequences: its decode step should cost what it costs with just enough clients
to fill it.

What it does, step by step:

1. start a cluster (1 prompt, 1 token service with --max-seqs, 1 cache store, the gateway with
   --max-queued-requests, the KV over --transport) on the model (the bundled one by default); warm
   it up with --max-seqs clients for 10 s;
2. alternate, --repeats times, two phases of --seconds each, every client in a closed loop (a new
   request as soon as the last one ended; after a 429, after its Retry-After). Every request is the
   same non-streaming greedy completion of --max-tokens tokens (ignore_eos):
   - "full": --max-seqs + 2 clients: the token service's batch is always full, two requests wait;
   - "overload": --clients clients: the batch is as full, and the rest wait or are refused;
   in each, the token service's mean decode step (its dejavu_token_step_seconds histogram, after
   the first --warmup seconds), the steps a second, each service's CPU use and the answers by
   status; 3 s between phases for the abandoned requests to leave;
3. print medians [min-max], the ratio overload / full (target: at most 1.10) and the answers
   (target: no 5xx); write JSON with --out (no plot). Nothing is asserted (the exit status is 0).

Progress goes to stderr, the table to stdout. With the defaults the phases take ~2.5 min after the
cluster has started (10 + 3 s of warm-up, then 2 x 2 x (30 + 3) s).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections import Counter

import httpx

from bench.common import bench_parser, fmt, log, metrics, spread, write_json
from dejavu.cluster import Cluster

TARGET_RATIO = 1.10
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


async def client(http: httpx.AsyncClient, body: dict, until: float, statuses: Counter) -> None:
    """Requests in a closed loop until `until` (monotonic s); a 429 waits its Retry-After."""
    while time.monotonic() < until:
        try:
            resp = await http.post("/v1/completions", json=body, timeout=max(until - time.monotonic(), 0.1))
        except httpx.TimeoutException:
            return  # the phase ended while it waited: it leaves (the gateway drops it from the queue)
        except httpx.HTTPError as exc:
            statuses[type(exc).__name__] += 1
            continue
        statuses[resp.status_code] += 1
        if resp.status_code == 429:
            await asyncio.sleep(min(float(resp.headers.get("retry-after", 1)), max(until - time.monotonic(), 0)))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def step_totals(url: str) -> tuple[float, float]:
    values = metrics(url)
    return values.get("dejavu_token_step_seconds_sum", 0.0), values.get("dejavu_token_step_seconds_count", 0.0)


async def phase(cluster: Cluster, clients: int, seconds: float, warmup: float, body: dict) -> dict:
    token = cluster.of("token")[0]
    statuses: Counter = Counter()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=cluster.url, limits=limits) as http:
        until = time.monotonic() + seconds
        tasks = [asyncio.create_task(client(http, body, until, statuses)) for _ in range(clients)]
        await asyncio.sleep(warmup)
        (s0, n0), t0 = step_totals(token.url), time.monotonic()
        cpu0 = {c.kind: cpu_seconds(c.pid) for c in cluster.children}
        await asyncio.sleep(max(until - time.monotonic(), 0))
        (s1, n1), t1 = step_totals(token.url), time.monotonic()
        cpu = {c.kind: round((cpu_seconds(c.pid) - cpu0[c.kind]) / (t1 - t0), 2) for c in cluster.children}
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(3.0)  # the cancelled requests leave the queue and free their KV
    steps = n1 - n0
    return {"clients": clients, "step_ms": (s1 - s0) / steps * 1e3 if steps else float("nan"),
            "steps_per_s": steps / (t1 - t0), "statuses": {str(k): v for k, v in statuses.items()},
            "cores_used": cpu}  # CPU seconds per second of each service while measured


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("overload", __doc__)
    parser.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a Hugging Face model folder")
    parser.add_argument("--clients", type=int, default=300, help="clients of the overload phase")
    parser.add_argument("--max-seqs", type=int, default=8,
                        help="sequences the token service runs at once (its KV room); the full phase has 2 "
                        "clients more")
    parser.add_argument("--max-queued-requests", type=int, default=100,
                        help="requests the gateway queues; past them it answers 429")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase, s")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds of each phase not measured")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the two phases, full then overload")
    parser.add_argument("--transport", choices=("ucx", "tcp"), default="ucx",
                        help="the KV transport between the services (DEJAVU_KV_TRANSPORT)")
    parser.add_argument("--logs", action="store_true", help="echo the services' logs (warnings) to stderr")
    parser.add_argument("--out", default="", metavar="FILE.json", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    env = {"DEJAVU_MAX_SEQS": str(args.max_seqs), "DEJAVU_MAX_QUEUED_REQUESTS": str(args.max_queued_requests),
           "DEJAVU_KV_TRANSPORT": args.transport, "DEJAVU_LOG_LEVEL": "warning"}
    body = {"prompt": PROMPT, "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0}
    runs = []
    log(f"starting 1 prompt, 1 token (--max-seqs {args.max_seqs}), 1 cache store, the gateway "
        f"(--max-queued-requests {args.max_queued_requests}) on {args.model}")
    with Cluster(args.model, port=0, env=env, echo_logs=args.logs) as cluster:
        asyncio.run(phase(cluster, args.max_seqs, 10.0, 5.0, body))  # warm up
        for repeat in range(args.repeats):
            for name, clients in (("full", args.max_seqs + 2), ("overload", args.clients)):
                result = asyncio.run(phase(cluster, clients, args.seconds, args.warmup, body))
                runs.append({"phase": name, "repeat": repeat, **result})
                log(f"repeat {repeat + 1}/{args.repeats} {name:>8} ({clients} clients): step "
                    f"{result['step_ms']:.1f} ms, answers {result['statuses']}, cores used {result['cores_used']}")
    by = {name: [r for r in runs if r["phase"] == name] for name in ("full", "overload")}
    step = {name: spread([r["step_ms"] for r in rs]) for name, rs in by.items()}
    ratios = [o["step_ms"] / f["step_ms"] for f, o in zip(by["full"], by["overload"])]
    answers = sum((Counter(r["statuses"]) for r in by["overload"]), Counter())
    server_errors = sum(v for k, v in answers.items() if not k.isdigit() or int(k) >= 500)
    summary = {"step_ms_full": step["full"], "step_ms_overload": step["overload"],
               "ratio_overload_over_full": spread(ratios), "target_ratio": TARGET_RATIO,
               "overload_answers": dict(answers), "server_errors": server_errors}
    print(f"\n{'phase':<9} {'clients':>7} {'decode step ms':>22}")
    for name, rs in by.items():
        print(f"{name:<9} {rs[0]['clients']:>7} {fmt(step[name]):>22}")
    print(f"\noverload / full step: {fmt(spread(ratios), 3)} (target <= {TARGET_RATIO}); answers under overload: "
          f"{dict(answers)}; 5xx or broken: {server_errors} (target 0); median of ratios "
          f"{statistics.median(ratios):.3f}")
    write_json(args.out, summary, runs=runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
