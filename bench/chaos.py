"""Chaos: many concurrent streams while token services, a cache store, a prompt service and Redis
itself fail at random moments. The failure contract, measured: every request completes, and each
output equals its failure-free output; once it is over no KV is held anywhere. Greedy outputs must
be exact, and so must seeded sampling's (counted apart: "exact seeded"): on either recovery path the
tokens already out after the replica's index (or after the prompt, on a re-prefill) are replayed
through decode steps, the computation that first made their KV.

What it does, step by step, for each transport (--transport both: tcp, then ucx, each on a cluster
of its own):

1. start a cluster of 3 token services (--max-seqs sequences each), 2 prompt services, 2 cache
   stores, a gateway and Redis, the KV sent over the transport (DEJAVU_KV_TRANSPORT);
2. reference: each distinct request body once, with no failure (12 bodies: 6 prompts x {greedy,
   seeded sampling}, ignore_eos, so every stream has --max-tokens tokens; they repeat across streams);
3. open --streams streams at once; as the tokens received cross thresholds drawn at random (--seed)
   between 10 % and 70 % of all tokens expected, inject the faults in a random order: SIGKILL a
   token service serving requests (--token-kills times), a cache store (--store-kills), a prompt
   service (--prompt-kills), each started again at once (as `dejavu up` does), and restart Redis
   empty (--redis-restarts; `redis-cli SHUTDOWN NOSAVE`, then start it);
4. collect per stream: completed or the error, exact or not, latency, longest pause between tokens;
   then wait for every KV gauge to come back to zero (at most 30 s) and read the gateway's recovery
   counts (replica, re-prefill);
5. print a row per transport, the faults and every stream that failed or differs; with --out, write
   the JSON. No plot. Nothing is asserted here (tests/cluster/test_chaos.py asserts a shorter run),
   but the exit status is 1 unless, on every transport, every stream completed, every greedy output
   was exact and no KV was left (the seeded outputs are counted, not checked).

Progress goes to stderr, the table to stdout. A default run (both transports) took ~5 min on the
2-vCPU VM of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time
from dataclasses import asdict, dataclass, field

import httpx

from bench.common import bench_parser, log, metrics, percentile, write_json
from dejavu.cluster import Child, Cluster

PROMPTS = ["The tallest mountain in the world is", "Once upon a time, in a land far away,", "Water boils at",
           "A short poem about the sea:", "List three colours: red,", "The history of the printing press"]
FAULTS = ("token", "cache_store", "prompt", "redis")


@dataclass
class Plan:
    streams: int = 100
    max_tokens: int = 160
    token_kills: int = 3
    store_kills: int = 1
    prompt_kills: int = 1
    redis_restarts: int = 1
    seed: int = 0

    def faults(self) -> list[str]:
        kinds = (["token"] * self.token_kills + ["cache_store"] * self.store_kills + ["prompt"] * self.prompt_kills
                 + ["redis"] * self.redis_restarts)
        random.Random(self.seed).shuffle(kinds)
        return kinds


@dataclass
class Stream:
    index: int
    body: int                 # which distinct body it sent (even: greedy, odd: seeded sampling)
    request_id: str = ""
    text: str = ""
    tokens: int = 0           # completion tokens (the usage the server reported)
    error: str = ""
    exact: bool = False
    latency_s: float = 0.0
    pause_s: float = 0.0      # longest gap between two chunks


@dataclass
class Fault:
    kind: str
    at_tokens: int            # tokens received by all streams when it was injected
    at_s: float               # seconds after the streams opened
    target: str = ""


@dataclass
class Report:
    transport: str
    plan: Plan
    streams: list[Stream] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    kv_held_after: dict = field(default_factory=dict)
    recoveries: dict = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def completed(self) -> int:
        return sum(not s.error for s in self.streams)

    @property
    def exact(self) -> int:
        return sum(s.exact for s in self.streams)

    @property
    def greedy_exact(self) -> bool:
        return all(s.exact for s in self.streams if s.body % 2 == 0)

    def exact_of(self, greedy: bool) -> str:
        of = [s for s in self.streams if (s.body % 2 == 0) == greedy]
        return f"{sum(s.exact for s in of)}/{len(of)}"

    def summary(self) -> dict:
        latency, pause = [s.latency_s for s in self.streams], [s.pause_s for s in self.streams]
        return {"transport": self.transport, "streams": len(self.streams), "completed": self.completed,
                "exact": self.exact, "exact_greedy": self.exact_of(True), "exact_seeded": self.exact_of(False),
                "faults": [f"{f.kind}@{f.at_s:.1f}s" for f in self.faults],
                "recoveries": self.recoveries, "kv_held_after": self.kv_held_after, "wall_s": round(self.wall_s, 1),
                "latency_s_p50": round(percentile(latency, 50), 2), "latency_s_p99": round(percentile(latency, 99), 2),
                "pause_s_p50": round(percentile(pause, 50), 2), "pause_s_max": round(max(pause, default=0), 2)}


def bodies(plan: Plan) -> list[dict]:
    """The distinct request bodies: every prompt greedy and with seeded sampling."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        base = {"prompt": prompt, "max_tokens": plan.max_tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        out += [{**base, "temperature": 0}, {**base, "temperature": 0.8, "top_p": 0.95, "seed": 1000 + i}]
    return out


async def one_stream(http: httpx.AsyncClient, stream: Stream, body: dict, progress: list[int]) -> None:
    start = last = time.monotonic()
    pieces = []
    try:
        async with http.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                stream.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    stream.error = f"error event: {chunk['error']['message']}"
                    return
                stream.request_id = chunk["id"].removeprefix("cmpl-")
                if chunk.get("usage"):
                    stream.tokens = chunk["usage"]["completion_tokens"]
                if not chunk["choices"]:
                    continue
                now = time.monotonic()
                stream.pause_s, last = max(stream.pause_s, now - last), now
                pieces.append(chunk["choices"][0]["text"])
                progress[0] += 1  # chunks: about one per token
    except httpx.HTTPError as exc:
        stream.error = f"{type(exc).__name__}: {exc}"
    finally:
        stream.text, stream.latency_s = "".join(pieces), time.monotonic() - start


def inject(cluster: Cluster, kind: str, rng: random.Random) -> str:
    """One fault; a killed service is started again at once (its requests resume elsewhere meanwhile)."""
    if kind == "redis":
        port = cluster.redis.port
        subprocess.run(["redis-cli", "-p", str(port), "SHUTDOWN", "NOSAVE"], capture_output=True, timeout=10)
        cluster.redis.proc.wait(10)
        cluster.restart_redis()
        return f"redis:{port}"
    live = [c for c in cluster.of(kind) if c.proc.poll() is None]
    busy = [c for c in live if kind != "token" or _holds_kv(c)]
    victim: Child = rng.choice(busy or live)
    cluster.kill(victim)
    victim.proc.wait(10)
    cluster.respawn(victim)
    return victim.name


def _holds_kv(child: Child) -> bool:
    return metrics(child.url).get("dejavu_token_sequences", 0.0) > 0


async def run(cluster: Cluster, plan: Plan, transport: str, references: dict[int, str] | None = None) -> Report:
    """The chaos run on a started cluster with an embedded Redis; `references` (body index ->
    failure-free text) are measured first when not given."""
    report, distinct = Report(transport, plan), bodies(plan)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=600, limits=limits) as http:
        if references is None:
            log(f"[{transport}] reference: {len(distinct)} bodies with no failure")
            refs = [Stream(i, i) for i in range(len(distinct))]
            await asyncio.gather(*(one_stream(http, s, distinct[s.body], [0]) for s in refs))
            bad = [s.error for s in refs if s.error]
            if bad:
                raise RuntimeError(f"the failure-free reference failed: {bad[0]}")
            references = {s.body: s.text for s in refs}
        report.streams = [Stream(i, i % len(distinct)) for i in range(plan.streams)]
        progress, expected = [0], plan.streams * plan.max_tokens
        rng = random.Random(plan.seed)
        kinds = plan.faults()
        thresholds = sorted(rng.uniform(0.1, 0.7) * expected for _ in kinds)
        log(f"[{transport}] {plan.streams} streams of {plan.max_tokens} tokens; faults {kinds} at "
            f"{[round(t / expected * 100) for t in thresholds]} % of the tokens")
        start = time.monotonic()
        tasks = [asyncio.create_task(one_stream(http, s, distinct[s.body], progress)) for s in report.streams]
        for kind, threshold in zip(kinds, thresholds):
            while progress[0] < threshold and not all(t.done() for t in tasks):
                await asyncio.sleep(0.02)
            target = await asyncio.to_thread(inject, cluster, kind, rng)
            report.faults.append(Fault(kind, progress[0], time.monotonic() - start, target))
            log(f"[{transport}] {kind} fault ({target}) at {progress[0]}/{expected} tokens")
        while not all(t.done() for t in tasks):
            await asyncio.sleep(2.0)
            log(f"[{transport}] {sum(t.done() for t in tasks)}/{len(tasks)} streams done, {progress[0]}/{expected} tokens")
        await asyncio.gather(*tasks)
        report.wall_s = time.monotonic() - start
    for s in report.streams:
        s.exact = not s.error and s.text == references[s.body]
        if not s.error and not s.exact:
            at = next((i for i, (a, b) in enumerate(zip(s.text, references[s.body])) if a != b), len(s.text))
            log(f"stream {s.index} ({s.request_id}) differs from its failure-free text at character {at}: "
                f"{s.text[max(at - 20, 0):at + 20]!r} vs {references[s.body][max(at - 20, 0):at + 20]!r}")
    await asyncio.to_thread(cluster.wait_ready, 120.0)  # the restarted services answer /metrics again
    report.kv_held_after = await asyncio.to_thread(kv_held, cluster)
    if report.kv_held_after:
        report.kv_held_after["replicas"] = await asyncio.to_thread(replicas_left, cluster, report.streams)
    report.recoveries = recoveries(cluster)
    return report


def kv_held(cluster: Cluster, timeout: float = 30.0) -> dict:
    """Every KV gauge of every service, waited for until all are zero (or `timeout`): what is left."""
    gauges = {"token": ("dejavu_token_sequences", "dejavu_token_kv_bytes_used"),
              "prompt": ("dejavu_prompt_in_flight_requests",),
              "cache_store": ("dejavu_cache_store_bytes_held", "dejavu_cache_store_bytes_spilled"),
              "gateway": ("dejavu_gateway_in_flight_requests", "dejavu_gateway_queued_requests")}
    deadline = time.monotonic() + timeout
    while True:
        held = {}
        for child in cluster.children:
            values = metrics(child.url)
            for name in gauges[child.kind]:
                if values.get(name, 0.0):
                    held[f"{child.name} {name}"] = values[name]
        if not held or time.monotonic() > deadline:
            return held
        time.sleep(0.5)


def replicas_left(cluster: Cluster, streams: list[Stream]) -> list[str]:
    """`store: request id (tokens, epoch)` for each replica still held (to say which leaked)."""
    left = []
    for store in cluster.of("cache_store"):
        for s in streams:
            try:
                resp = httpx.get(f"{store.url}/replicas/{s.request_id}", headers=cluster.internal_headers, timeout=5)
            except httpx.HTTPError:
                continue
            if resp.status_code == 200:
                body = resp.json()
                left.append(f"{store.name}: {s.request_id} (stream {s.index}, {body['tokens']} tokens, epoch {body['epoch']})")
    return left


def recoveries(cluster: Cluster) -> dict:
    values = metrics(cluster.url)
    return {path: values.get(f'dejavu_gateway_recoveries_total{{path="{path}"}}', 0.0) for path in ("replica", "reprefill")}


def cluster_for(model: str, transport: str, env: dict | None = None, logs: bool = False) -> Cluster:
    env = {"DEJAVU_KV_TRANSPORT": transport, "DEJAVU_TOKEN_TIMEOUT_S": "3", "DEJAVU_THREADS": "1",
           "DEJAVU_MAX_MODEL_LEN": "512", "DEJAVU_LOG_LEVEL": "info" if logs else "warning", **(env or {})}
    return Cluster(model, port=0, prompt_services=2, token_services=3, cache_stores=2, env=env, echo_logs=logs)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("chaos", __doc__)
    parser.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a Hugging Face model folder")
    parser.add_argument("--transport", choices=("tcp", "ucx", "both"), default="both",
                        help="the KV transport of the cluster (both: a run on each, one after the other)")
    plan = Plan()
    helps = {"streams": "streams open at once", "max_tokens": "tokens of every stream (ignore_eos)",
             "token_kills": "token services SIGKILLed", "store_kills": "cache stores SIGKILLed",
             "prompt_kills": "prompt services SIGKILLed", "redis_restarts": "restarts of Redis, empty",
             "seed": "seed of the faults' order, moments and victims"}
    for name, value in asdict(plan).items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=value, help=helps[name])
    parser.add_argument("--max-seqs", type=int, default=32, help="sequences per token service")
    parser.add_argument("--logs", action="store_true", help="echo the services' logs (info level) to stderr")
    parser.add_argument("--out", default="", metavar="FILE.json", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    plan = Plan(**{name: getattr(args, name) for name in asdict(plan)})
    reports = []
    for transport in (("tcp", "ucx") if args.transport == "both" else (args.transport,)):
        log(f"[{transport}] starting 3 token, 2 prompt, 2 cache store services, a gateway and Redis ({args.model})")
        with cluster_for(args.model, transport, {"DEJAVU_MAX_SEQS": str(args.max_seqs)}, args.logs) as cluster:
            reports.append(asyncio.run(run(cluster, plan, transport)))
    print(f"\n{'transport':<9} {'done':>8} {'exact: greedy':>13} {'seeded':>7} {'latency p50/p99 s':>18} "
          f"{'longest pause s':>16} {'recoveries (replica/reprefill)':>31}  KV left")
    for r in reports:
        s = r.summary()
        print(f"{r.transport:<9} {s['completed']:>4}/{s['streams']:<3} {s['exact_greedy']:>13} {s['exact_seeded']:>7} "
              f"{s['latency_s_p50']:>8.1f}/{s['latency_s_p99']:<9.1f} {s['pause_s_max']:>16.1f} "
              f"{r.recoveries['replica']:>15.0f}/{r.recoveries['reprefill']:<15.0f}  {r.kv_held_after or 'none'}")
        for f in r.faults:
            print(f"    {f.kind:<12} {f.target:<20} at {f.at_s:5.1f} s ({f.at_tokens} tokens)")
        for st in r.streams:
            if st.error or not st.exact:
                print(f"    stream {st.index} ({st.request_id}): {st.error or 'text differs from the failure-free run'}")
    write_json(args.out, {r.transport: r.summary() for r in reports},
               runs=[{"transport": r.transport, "plan": asdict(r.plan), "faults": [asdict(f) for f in r.faults],
                      "streams": [asdict(s) | {"text": None} for s in r.streams]} for r in reports])
    ok = [r.completed == len(r.streams) and r.greedy_exact and not r.kv_held_after for r in reports]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
