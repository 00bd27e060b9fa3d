"""Failure benchmark: the latency of one request whose token service dies mid-decode (DéjàVu, Strati
et al. ICML 2024, "latency with a failure"), and the decode throughput that replication costs.

What it does, step by step:

1. build one prompt of --prompt-tokens token ids from text (the model's tokenizer);
2. start two clusters of 1 prompt and 2 token services: "ft" (a cache store, resume on) and
   "plain" (no cache store, DEJAVU_RESUME_ATTEMPTS=0: fault tolerance off); warm them up;
3. each repeat runs, in turn, one streaming greedy completion of --new-tokens tokens (ignore_eos):
   - no failure (ft): latency from sending the request to its last token;
   - resume (ft): SIGKILL the token service serving it once the client has --kill-at tokens; the
     gateway resumes it elsewhere. Also: the pause (longest gap between tokens), the recovery path
     the gateway counted, and whether the text equals the failure-free one ("exact");
   - restart (plain): the same kill ends the stream with an error event; the client sends the
     request again; latency from the first send to the last token of the second attempt;
   a killed service is started again, awaited in the gateway's /cluster and warmed up;
4. unless --skip-throughput: two clusters of 1 prompt and 1 token service, replication on (a cache
   store) and off (none); --concurrency concurrent non-streaming requests of
   --throughput-prompt-tokens + --throughput-new-tokens on each, the two alternating, --repeats
   times: tokens / wall time;
5. print medians [min-max] over repeats, the multipliers over no failure against the paper's (resume
   1.24x, restart 1.91x) and the targets (resume <= 1.10x, replication on/off >= 0.97); write JSON
   and a plot of tokens received against time. Nothing is asserted: this measures, it does not test.

Progress goes to stderr, the tables to stdout. --out FILE.json writes the figures there and the plot
beside it (FILE-timeline.png); without --out, only the plot, as bench/out/failure-timeline.png.
A default run took ~15 min on the 2-vCPU VM of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import statistics
import time
from dataclasses import asdict, dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.common import bench_parser, fmt, log, plot_path, pyplot, save, spread, write_json
from bench.serve import build_prompts
from common.model import load_tokenizer, resolve_model_path
from dejavu.cluster import Child, Cluster

PAPER = {"resume": 1.24, "restart": 1.91}   # latency multipliers in the paper's figure
TARGET_RESUME, TARGET_THROUGHPUT = 1.10, 0.97
SCENARIOS = ("no_failure", "resume", "restart")
READY_S = 180.0


@dataclass
class Run:
    scenario: str        # no_failure | resume | restart
    repeat: int
    latency_s: float     # first byte sent -> last token received (restart: of the second attempt)
    pause_s: float       # longest gap between two tokens received
    tokens: int          # tokens received in the (last) attempt
    killed: str          # the token service killed, "" if none
    recovery: str        # recovery paths the gateway counted during the run, e.g. "replica"
    error: str           # the error event the client saw, "" if none
    exact: bool          # the text equals the first failure-free text
    text: str
    offsets: list[float]  # when each token arrived, s after the first send (the timeline plot)


@dataclass
class Stream:
    text: str
    times: list[float]   # perf_counter when each token arrived
    error: str
    killed: str


# --- one streaming request, with an optional kill ------------------------------------------------
def owner(client: httpx.Client, cluster: Cluster) -> Child | None:
    """The token service holding KV rows (only one request runs at a time)."""
    return next((c for c in cluster.of("token")
                 if c.proc.poll() is None and metric(client, c.url, "dejavu_token_sequences") > 0), None)


def metric(client: httpx.Client, url: str, name: str, **labels: str) -> float:
    text = client.get(url + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def stream(client: httpx.Client, cluster: Cluster, body: dict, kill_at: int = 0) -> Stream:
    """One streaming completion; with kill_at, SIGKILL its token service once kill_at tokens are in."""
    out, found = Stream("", [], "", ""), None
    try:
        with client.stream("POST", cluster.url + "/v1/completions", json=body) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = chunk["error"].get("message", str(chunk["error"]))
                    continue
                for choice in chunk.get("choices") or []:  # logprobs=0: one entry per token
                    out.text += choice["text"]
                    out.times += [time.perf_counter()] * len((choice.get("logprobs") or {}).get("tokens") or [])
                if kill_at and not out.killed and out.times:
                    found = found or owner(client, cluster)
                    if found and len(out.times) >= kill_at:
                        cluster.kill(found, signal.SIGKILL)
                        out.killed = found.name
    except httpx.HTTPError as exc:  # a broken stream is a result too: record it, go on
        out.error = f"{type(exc).__name__}: {exc}"
    return out


def respawn(client: httpx.Client, cluster: Cluster, name: str) -> None:
    """Start the killed service again; return once the gateway lists exactly the live token services."""
    dead = next(c for c in cluster.of("token") if c.name == name)
    dead.proc.wait()
    cluster.wait_ready(READY_S, [cluster.respawn(dead)])
    want, deadline = sorted(c.pid for c in cluster.of("token")), time.monotonic() + READY_S
    while sorted(s["pid"] for s in client.get(cluster.url + "/cluster").json()["services"]
                 if s["kind"] == "token") != want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway does not list {name} again after {READY_S:.0f} s")
        time.sleep(0.2)


def launch(stack: contextlib.ExitStack, name: str, model: str, tokens: int, stores: int, env: dict) -> Cluster:
    """A cluster of 1 prompt service, stopped when `stack` closes (Ctrl-C included)."""
    log(f"starting cluster '{name}' (1 prompt service, {tokens} token service(s), cache stores: {stores})")
    return stack.enter_context(Cluster(model, port=0, prompt_services=1, token_services=tokens, cache_stores=stores,
                                       env=env, echo_logs=False))


def warm_up(cluster: Cluster, ids: list[int]) -> None:
    """Two concurrent short requests: the gateway puts them on different token services."""
    body = {"prompt": ids, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    asyncio.run(batch(cluster.url, [body, body]))


# --- the latency scenarios -------------------------------------------------------------------------
def recoveries(client: httpx.Client, cluster: Cluster) -> dict[str, float]:
    return {p: metric(client, cluster.url, "dejavu_gateway_recoveries_total", path=p) for p in ("replica", "reprefill")}


def run_once(scenario: str, repeat: int, clusters: dict[str, Cluster], body: dict, args, reference: str) -> Run:
    cluster = clusters["plain" if scenario == "restart" else "ft"]
    kill_at = 0 if scenario == "no_failure" else args.kill_at
    with httpx.Client(timeout=httpx.Timeout(900.0)) as client:
        before = recoveries(client, cluster)
        sent = time.perf_counter()
        first = last = stream(client, cluster, body, kill_at)
        if scenario == "restart" and first.error:
            last = stream(client, cluster, body)  # from scratch, as a client of a system without resume
        after = recoveries(client, cluster)
        if first.killed:
            respawn(client, cluster, first.killed)
            warm_up(cluster, body["prompt"])
    times = (first.times + last.times) if last is not first else first.times
    counted = ",".join(p for p in after if after[p] > before[p])
    pause = max((b - a for a, b in zip(times, times[1:])), default=0.0)
    return Run(scenario, repeat, (times[-1] if times else time.perf_counter()) - sent, pause, len(last.times),
               first.killed, counted, first.error or last.error, last.text == (reference or last.text), last.text,
               [round(t - sent, 4) for t in times])


def latency_runs(args, ids: list[int], env: dict[str, str]) -> list[Run]:
    body = {"prompt": ids, "max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "logprobs": 0}  # logprobs: each chunk lists its tokens, so the client counts tokens, not chunks
    with contextlib.ExitStack() as stack:
        clusters = {"ft": launch(stack, "ft", args.model, 2, 1, env),
                    "plain": launch(stack, "plain", args.model, 2, 0, {**env, "DEJAVU_RESUME_ATTEMPTS": "0"})}
        for cluster in clusters.values():
            warm_up(cluster, ids)
        runs, reference = [], ""
        for r in range(1, args.repeats + 1):
            for scenario in SCENARIOS:
                run = run_once(scenario, r, clusters, body, args, reference)
                reference = reference or (run.text if scenario == "no_failure" else "")
                runs.append(run)
                log(f"repeat {r}/{args.repeats} {scenario:<10}: {run.latency_s:6.2f} s, pause {run.pause_s:5.2f} s, "
                    f"{run.tokens} tokens, killed {run.killed or '-'}, recovery {run.recovery or '-'}, "
                    f"exact {'yes' if run.exact else 'no'}" + (f", error event: {run.error}" if run.error else ""))
    return runs


# --- decode throughput, replication on and off ---------------------------------------------------
async def batch(url: str, bodies: list[dict], concurrency: int | None = None) -> int:
    """Completion tokens of non-streaming requests: all at once by default; with `concurrency`, that
    many clients in a closed loop, each sending the next body when its last one returned."""
    queue = list(reversed(bodies))
    clients = min(concurrency or len(bodies), len(bodies))
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900.0), limits=limits) as client:
        async def worker() -> int:
            tokens = 0
            while queue:
                resp = await client.post("/v1/completions", json=queue.pop())
                resp.raise_for_status()
                tokens += resp.json()["usage"]["completion_tokens"]
            return tokens
        return sum(await asyncio.gather(*(worker() for _ in range(clients))))


def throughput_runs(args, prompts: list[list[int]], env: dict[str, str]) -> list[dict]:
    bodies = [{"prompt": ids, "max_tokens": args.throughput_new_tokens, "temperature": 0, "ignore_eos": True}
              for ids in prompts]
    with contextlib.ExitStack() as stack:
        clusters = {side: launch(stack, f"replication {side}", args.model, 1, stores, env)
                    for side, stores in (("on", 1), ("off", 0))}
        for cluster in clusters.values():
            asyncio.run(batch(cluster.url, bodies[:2]))  # warm-up
        runs = []
        for r in range(1, args.repeats + 1):
            for side, cluster in clusters.items():
                t0 = time.perf_counter()
                tokens = asyncio.run(batch(cluster.url, bodies))
                wall = time.perf_counter() - t0
                runs.append({"replication": side, "repeat": r, "tokens": tokens, "wall_s": wall,
                             "tokens_per_s": tokens / wall})
                log(f"repeat {r}/{args.repeats} replication {side:<3}: {tokens / wall:7.1f} tok/s "
                    f"({tokens} tokens in {wall:.1f} s)")
    return runs


# --- the report ------------------------------------------------------------------------------------
def summarize(runs: list[Run], tput: list[dict]) -> tuple[dict, dict]:
    rows = {s: {"latency_s": spread([r.latency_s for r in runs if r.scenario == s]),
                "pause_s": spread([r.pause_s for r in runs if r.scenario == s]),
                "exact": all(r.exact for r in runs if r.scenario == s),
                "recovery": sorted({r.recovery or "-" for r in runs if r.scenario == s}),
                "errors": sum(bool(r.error) for r in runs if r.scenario == s)} for s in SCENARIOS}
    summary = {f"latency_s_{s}": rows[s]["latency_s"]["median"] for s in SCENARIOS}
    summary |= {f"multiplier_{s}": summary[f"latency_s_{s}"] / summary["latency_s_no_failure"] for s in SCENARIOS[1:]}
    summary |= {"pause_s_resume": rows["resume"]["pause_s"]["median"], "exact_resume": rows["resume"]["exact"]}
    for side in ("on", "off"):
        values = [t["tokens_per_s"] for t in tput if t["replication"] == side]
        rows[f"replication_{side}"] = spread(values) if values else None
        summary[f"throughput_tok_s_replication_{side}"] = statistics.median(values) if values else None
    on, off = summary["throughput_tok_s_replication_on"], summary["throughput_tok_s_replication_off"]
    summary["throughput_ratio_on_off"] = on / off if on and off else None  # None: skipped
    return summary, rows


def print_report(summary: dict, rows: dict, args) -> None:
    print(f"\nprompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, kill at token {args.kill_at}, "
          f"{args.repeats} repeat(s); median [min-max] over repeats")
    print(f"{'scenario':<11} {'latency s':>20} {'x no failure':>12} {'pause s':>20}  {'recovery':<16} exact")
    for s in SCENARIOS:
        row, mult = rows[s], summary["latency_s_" + s] / summary["latency_s_no_failure"]
        errors = f"  ({row['errors']} error event(s))" if row["errors"] else ""
        print(f"{s:<11} {fmt(row['latency_s'], 2):>20} {mult:>11.2f}x {fmt(row['pause_s'], 2):>20}  "
              f"{','.join(row['recovery']):<16} {'yes' if row['exact'] else 'no'}{errors}")
    print(f"paper: resume {PAPER['resume']}x, restart {PAPER['restart']}x; target: resume <= {TARGET_RESUME}x: "
          f"{'MET' if summary['multiplier_resume'] <= TARGET_RESUME else 'NOT MET'} "
          f"({summary['multiplier_resume']:.2f}x); exact: {'yes' if summary['exact_resume'] else 'no'}")
    if (ratio := summary["throughput_ratio_on_off"]) is None:
        return
    print(f"\ndecode throughput, {args.concurrency} concurrent, prompt {args.throughput_prompt_tokens}, "
          f"{args.throughput_new_tokens} new tokens each:")
    for side in ("on", "off"):
        print(f"replication {side:<3}: {fmt(rows['replication_' + side])} tok/s")
    print(f"on/off: {ratio:.3f}; target >= {TARGET_THROUGHPUT}: {'MET' if ratio >= TARGET_THROUGHPUT else 'NOT MET'}")


def parse_args(argv: list[str] | None = None):
    p = bench_parser("failure", __doc__)
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a Hugging Face model folder")
    p.add_argument("--repeats", type=int, default=3, help="runs of each scenario (and of each throughput side)")
    p.add_argument("--prompt-tokens", type=int, default=500, help="prompt length of the latency runs (tokens)")
    p.add_argument("--new-tokens", type=int, default=300, help="tokens generated by the latency runs")
    p.add_argument("--kill-at", type=int, default=150, help="SIGKILL the serving token service after this many tokens")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent requests of the throughput runs")
    p.add_argument("--throughput-prompt-tokens", type=int, default=200,
                   help="prompt length per throughput request (tokens)")
    p.add_argument("--throughput-new-tokens", type=int, default=128, help="tokens generated per throughput request")
    p.add_argument("--skip-throughput", action="store_true", help="measure only the latency scenarios")
    p.add_argument("--env", action="append", default=[], metavar="DEJAVU_X=V",
                   help="a setting for every service (repeatable; none by default), e.g. DEJAVU_KV_TRANSPORT=tcp")
    p.add_argument("--out", default="", metavar="FILE.json",
                   help="write the raw runs and a summary to this JSON file (the plot beside it)")
    args = p.parse_args(argv)
    if min(args.repeats, args.concurrency, args.prompt_tokens, args.throughput_prompt_tokens,
           args.throughput_new_tokens) < 1:
        p.error("--repeats, --concurrency and the token counts must be >= 1")
    if not 1 <= args.kill_at < args.new_tokens:
        p.error(f"--kill-at {args.kill_at}: must be in 1..--new-tokens - 1 ({args.new_tokens - 1})")
    if bad := [e for e in args.env if not e.startswith("DEJAVU_") or "=" not in e]:
        p.error(f"--env {bad[0]!r}: give DEJAVU_NAME=VALUE")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tokenizer = load_tokenizer(resolve_model_path(args.model, progress=log))
    longest = max(args.prompt_tokens + args.new_tokens, args.throughput_prompt_tokens + args.throughput_new_tokens)
    env = {"DEJAVU_LOG_LEVEL": "warning", "DEJAVU_MAX_SEQS": str(max(16, args.concurrency)),
           "DEJAVU_MAX_MODEL_LEN": str(max(2048, longest + 16)), **dict(e.split("=", 1) for e in args.env)}
    runs = latency_runs(args, build_prompts(tokenizer, args.prompt_tokens, 1)[0], env)
    tput = [] if args.skip_throughput else throughput_runs(
        args, build_prompts(tokenizer, args.throughput_prompt_tokens, args.concurrency), env)
    summary, rows = summarize(runs, tput)
    print_report(summary, rows, args)
    write_json(args.out, summary, config={k: v for k, v in vars(args).items() if k != "out"}, rows=rows, env=env,
               latency_runs=[asdict(r) for r in runs], throughput_runs=tput)
    plot_timeline(runs, args)


def plot_timeline(runs: list[Run], args) -> None:
    """Tokens received against time, for the first repeat of each scenario."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for scenario in SCENARIOS:
        run = next(r for r in runs if r.scenario == scenario)
        ax.plot(run.offsets, range(1, len(run.offsets) + 1), label=f"{scenario} ({run.latency_s:.1f} s)")
    ax.set_xlabel("seconds since the request was sent")
    ax.set_ylabel("output tokens received")
    ax.set_title(f"A token service killed at token {args.kill_at} (restart: the client sends it again)")
    ax.legend()
    save(fig, plot_path(args.out, "failure", "timeline"))


if __name__ == "__main__":
    main()
