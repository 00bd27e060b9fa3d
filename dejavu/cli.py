"""dejavu: run and inspect a DéjàVu serving cluster.

  dejavu up [--model M] [--port 8000] [--prompt-services 1] [--token-services 1] [--cache-stores 1]
            [--colocated] [--stages 1] [--prompt-stages 1] [--swap --kv-device-bytes B] [--redis-url URL] [--kv-transport ucx|tcp] [--dtype auto|float32|bfloat16|float16]
            [--cpu-placement auto|split|turns|off] [--api-key KEY ...] [--max-queued-requests 1024] [--responses-ttl-s 3600]
            [--tool-call-parser auto|hermes|llama3_json|mistral|none] [--reasoning-parser auto|deepseek_r1|qwen3|none]
            [--prefix-cache-mib 1024] [--prefix-routing on|off]
  dejavu status [--redis-url URL] [--json]
  dejavu bench NAME [ARGS]   (kv, stream, load, failure, replication, serve, step, gemm, agreement, capacity, chaos, overload, pipeline, swap, startup, lmeval, sampling, prefix, sglang_client: python -m bench.NAME)
  dejavu profile [--model M] [--quick] [--out profile.json]
  dejavu plan --profile FILE --machines D --prompt-tokens P --output-tokens N [--json] [--rate R] [--ttft-s X --tpot-s Y]
  dejavu simulate --profile FILE [--layout 1+1 --layout colocated] [--rates 0.2,0.4] [--plot FILE.png]
  (profile, plan, simulate: dejavu/planning.py)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import sys
import time

from common.model import ModelNotFound, resolve_model_path
from common.settings import REDIS_SCHEMES, is_loopback
from dejavu import planning


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dejavu", description="DéjàVu serving: fault-tolerant, disaggregated "
                                     "LLM serving with an OpenAI-compatible API.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the whole cluster locally, one process per service",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    up.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a Hugging Face model folder")
    up.add_argument("--port", type=int, default=8000, help="gateway port")
    up.add_argument("--host", default="127.0.0.1", help="interface every service binds to")
    up.add_argument("--prompt-services", type=int, default=1, help="prefill engines")
    up.add_argument("--colocated", action="store_true",
                    help="colocated mode: each token service prefills its own requests; no prompt service is started "
                    "(--prompt-services is ignored)")
    up.add_argument("--token-services", type=int, default=1, help="decode engines")
    up.add_argument("--stages", type=int, default=1,
                    help="pipeline stages per token service: its layers split evenly over this many processes, "
                    "each with the KV of its own layers, activations handed on over the KV transport (Llama-family "
                    "models); a stage's failure ends its pipeline, whose requests resume elsewhere from their replicas")
    up.add_argument("--prompt-stages", type=int, default=1,
                    help="pipeline stages per prompt service, as --stages for token services: each stage streams "
                    "its layers' KV straight to the token process that holds those layers (Llama-family models)")
    up.add_argument("--microbatches", type=int, default=0,
                    help="decode steps in flight per token service (0: one per stage)")
    up.add_argument("--kv-device-bytes", type=int, default=0,
                    help="each token engine's device KV budget in bytes (a stage's: of the largest stage's layers): "
                    "the KV pool's size, or with --swap the room of the steps being computed (0: none). At least one "
                    "sequence of --max-model-len, two with --swap; `dejavu up` says how much when it is short "
                    "(SmolLM2 in float32 at --max-model-len 2048: 94371840, for one stage without --swap or for each of 2 "
                    "stages with it)")
    up.add_argument("--swap", action="store_true",
                    help="microbatch KV swapping: the KV pool in host memory, only the microbatch computing and "
                    "the next one in --kv-device-bytes (needs it; not with --colocated)")
    up.add_argument("--cache-stores", type=int, default=1, help="KV replica stores")
    up.add_argument("--redis-url", default=None, help="use this Redis instead of starting an embedded one")
    up.add_argument("--kv-transport", choices=("ucx", "tcp"), default="ucx", help="KV transport")
    up.add_argument("--kv-shm-mib", type=int, default=32,
                    help="shared-memory ring (MiB) each way of a KV link between two of its services: payloads of "
                    "64 KiB or more skip the loopback (x86-64; 0: every byte over the transport)")
    up.add_argument("--max-model-len", type=int, default=2048, help="longest sequence served (tokens)")
    up.add_argument("--max-seqs", type=int, default=16, help="sequences decoding at once per token service")
    up.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                    help="weights, activations and KV of every engine (auto: the model's dtype on CUDA, float32 on CPU)")
    up.add_argument("--max-queued-requests", type=int, default=1024,
                    help="requests that may wait, in order, for KV room when every token service is full; more "
                    "get a 429 with Retry-After (as do those still waiting after DEJAVU_ROUTE_TIMEOUT_S, 300 s)")
    up.add_argument("--responses-ttl-s", type=float, default=3600.0,
                    help="how long a /v1/responses answer is kept in Redis, for previous_response_id and "
                    "GET /v1/responses/{id} (s; 0: none kept, and 'store' is answered false)")
    up.add_argument("--prefix-cache-mib", type=int, default=1024,
                    help="host memory each prompt service (each token service, with --colocated) keeps the KV of "
                    "prompt blocks it prefilled in: a prompt that starts with the same tokens (a system prompt, a "
                    "chat's earlier turns) computes only the rest (0: off; not with --prompt-stages, nor --stages "
                    "with --colocated)")
    up.add_argument("--prefix-routing", choices=("on", "off"), default="on",
                    help="send a prompt to the prompt service (with --colocated: the token service) that prefilled "
                    "its longest prefix last (of 64 tokens and a quarter of the prompt at least), whose prefix cache "
                    "likely holds it, unless that one has more than 2 requests in flight beyond the least loaded "
                    "(off: the least loaded always)")
    up.add_argument("--reasoning-parser", choices=("auto", "deepseek_r1", "qwen3", "none"), default="auto",
                    help="on chat, the text between <think> and </think> as the message's reasoning_content (and "
                    "reasoning), the rest as its content: qwen3 and deepseek_r1 read alike, none leaves the text "
                    "whole, auto is qwen3 where the model's chat template writes </think>")
    up.add_argument("--tool-call-parser", choices=("auto", "hermes", "llama3_json", "mistral", "none"),
                    default="auto",
                    help="how chat's tool_choice 'auto' finds tool calls in the output: hermes "
                    "(<tool_call>{...}</tool_call>, Qwen2.5/3 and Hermes), llama3_json (an output that starts with "
                    "{\"name\": ..., \"parameters\": ...}, Llama 3.1-3.3), mistral ([TOOL_CALLS] and the calls), "
                    "none ('auto' is a 400; 'required' and a named function work with any model), auto (from what "
                    "the chat template writes: <tool_call>, [TOOL_CALLS] or <|python_tag|>)")
    up.add_argument("--block-size", type=int, default=16, help="tokens per block of the paged KV pool")
    up.add_argument("--kv-blocks", type=int, default=0,
                    help="KV pool blocks per token service (0: room for --max-seqs sequences of --max-model-len)")
    up.add_argument("--compile", action="store_true",
                    help="token services run decode steps through torch.compile (measured no faster on a 2-core "
                    "CPU, 0.90-1.04x, for 35-62 s more start-up)")
    up.add_argument("--enforce-eager", action="store_true",
                    help="on a GPU, token services run every decode step eagerly instead of replaying CUDA graphs of "
                    "it (as vLLM's flag; no effect on a CPU)")
    up.add_argument("--cpu-placement", choices=("auto", "split", "turns", "off"), default="auto",
                    help="on a Linux host without a GPU, how the prompt and token services share the cores. split: "
                    "each pinned to its own slice, one torch thread per core (more engines than cores: none pinned, "
                    "one thread each). turns: each runs a thread per core and they take turns, one forward at a "
                    "time (more throughput on small hosts; decode steps wait behind prefills). auto: turns when a "
                    "split would give an engine fewer than 4 cores, else split. Both override DEJAVU_THREADS. off: "
                    "every engine runs DEJAVU_THREADS or torch's default on every core, at the same time")
    up.add_argument("--api-key", action="append", default=None, metavar="KEY",
                    help="clients must send 'Authorization: Bearer KEY' (or 'x-api-key: KEY', as Anthropic's SDK "
                    "does) on every route but /health and /metrics (repeat for several keys; also "
                    "DEJAVU_API_KEYS=K1,K2; none: no authentication, fine on loopback only)")
    up.add_argument("--quiet", action="store_true", help="don't echo the services' logs")
    status = sub.add_parser("status", help="list the services registered in Redis")
    status.add_argument("--redis-url", default="",
                        help="the cluster's Redis (default: $DEJAVU_REDIS_URL, else the one `dejavu up` runs on this "
                        "machine when exactly one runs, else redis://127.0.0.1:6379/0)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    bench = sub.add_parser("bench", help="run a benchmark (same as python -m bench.NAME)",
                           description="Run a benchmark: it prints progress, a table of medians [min-max] over "
                           "repeats, and with --out writes the figures as JSON (plots beside it). "
                           "`dejavu bench NAME --help` lists a benchmark's options.")
    bench.add_argument("name", choices=BENCHMARKS, metavar="NAME", help=" | ".join(
        f"{name}: {what}" for name, what in BENCHMARKS.items()))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options")
    planners = planning.add_parsers(sub)
    args = parser.parse_args(argv)
    if args.command in planners:
        sys.exit(planning.run(args, planners[args.command]))
    if args.command == "bench":
        import importlib

        sys.exit(importlib.import_module(f"bench.{args.name}").main(args.args))
    sys.exit(cmd_up(args, parser) if args.command == "up" else cmd_status(args))


BENCHMARKS = {
    "kv": "KV transports and copies against an in-process memcpy",
    "stream": "time to first token: colocated, layer-by-layer streaming, one transfer after prefill",
    "load": "open-loop Poisson load against our cluster, colocated mode, a naive HF server and peers",
    "failure": "latency when a token service dies mid-request: resume vs restart vs no failure",
    "replication": "decode throughput against the replication interval",
    "serve": "closed-loop throughput and TTFT against Hugging Face generate",
    "step": "the engine's decode step against batch size, ours against the Hugging Face modules",
    "gemm": "a decode step's linears alone: our GEMM against oneDNN's, by rows and dtype",
    "agreement": "top-1 agreement of our logits with Hugging Face's, teacher-forced, float32 and bf16, and how "
                 "often seeded draws from the two pick the same token",
    "capacity": "chat-length requests that fit in a KV budget: whole rows against paged blocks",
    "chaos": "concurrent streams while token services, a cache store, a prompt service and Redis fail",
    "overload": "the token service's decode step with far more clients than KV room, against a full batch",
    "pipeline": "a 2-stage token pipeline with microbatches against one step at a time, colocated and 1 stage",
    "swap": "at one device KV budget, the largest batch and tokens/s with microbatch KV swapping against without",
    "startup": "spawned to ready: one token service and a whole cluster, optionally against another source tree",
    "lmeval": "lm-evaluation-harness's loglikelihoods through our cluster against the harness on HF in float32",
    "sampling": "what penalties, logit biases and min-p add to sampling a decode step's rows",
    "prefix": "what the prefix cache does for a chat's later turns' time to first token (--colocated too)",
    "sglang_client": "SGLang's load client against us, on SGLang's /generate and on /v1/completions",
}


def bind_problem(host: str, port: int) -> str | None:
    """Why the gateway could not bind `port` on `host` now (as it will: SO_REUSEADDR, as uvicorn),
    in words for --host and --port; None if it could."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except socket.gaierror as exc:
            return f"--host {host!r} is no address of this machine ({exc.strerror})"
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use: stop what holds it, or pick another --port"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"--host {host} is no address of this machine: give one of its own, 127.0.0.1 or 0.0.0.0"
            if exc.errno == errno.EACCES:
                return f"port {port} needs privileges to bind (below 1024): pick another --port"
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


BAD_SCHEME = "must start with redis://, rediss:// or unix://"  # (common.settings.REDIS_SCHEMES)


REDIS_WAIT_S = 10.0  # how long `dejavu up --redis-url` waits for that Redis to answer


def redis_problem(url: str) -> str | None:
    """Why `url` is no Redis the services could use, or None: it must answer PING within
    REDIS_WAIT_S (one started beside `dejavu up` may take a few seconds)."""
    import redis

    if not url.startswith(REDIS_SCHEMES):
        return BAD_SCHEME
    deadline, said = time.monotonic() + REDIS_WAIT_S, False
    while True:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
            return None
        except Exception as exc:  # noqa: BLE001 - refused, timed out, a wrong password, not Redis: all said alike
            if time.monotonic() > deadline:
                return f"no Redis answered there within {REDIS_WAIT_S:.0f} s ({type(exc).__name__}: {exc})"
            if not said:
                print(f"[dejavu] waiting for Redis at {url} ...", file=sys.stderr, flush=True)
                said = True
            time.sleep(0.5)
        finally:
            client.close()


def _check_model_fits(args, parser, path) -> None:
    """What the engines would refuse only after every process had loaded the model: more stages
    than layers, a --kv-device-bytes that does not hold one sequence (two with --swap). Read off
    the model's config; where it cannot be read here, the engines still check."""
    prompt_stages = args.prompt_stages if not args.colocated else 1
    if args.stages == 1 and prompt_stages == 1 and not args.kv_device_bytes:
        return  # nothing to check (and no transformers to import into this long-lived process)
    import torch
    from transformers import AutoConfig

    from common.model import context_length, engine_dtype
    from common.settings import kv_device_bytes_needed
    from engine.runner import KVShape, stage_layers

    try:
        config = AutoConfig.from_pretrained(path)
        # None: on CUDA a config without a dtype leaves it to the weights, not read here
        dtype = engine_dtype(args.dtype, "cuda" if torch.cuda.is_available() else "cpu", getattr(config, "dtype", None))
        kv = KVShape.of_config(config, getattr(torch, dtype)) if dtype else None
        layers = config.num_hidden_layers
        max_len = min(args.max_model_len, context_length(path))  # the engines cap it so too
    except Exception as exc:  # noqa: BLE001 - a config this check cannot read: the engines will say
        print(f"[dejavu] could not check the model's layers and KV size ahead ({type(exc).__name__}: {exc}); "
              "the services will", file=sys.stderr)
        return
    for flag, n in (("--stages", args.stages), ("--prompt-stages", prompt_stages)):
        if n > layers:
            parser.error(f"{flag} {n}: the model has {layers} layers, and each stage needs one at least")
    if args.kv_device_bytes and kv is not None:
        need = kv_device_bytes_needed(max_len, args.block_size, kv.stage_block_bytes(args.stages, args.block_size),
                                      args.swap)  # as the engines' kv_room sums it
        if args.kv_device_bytes < need:
            what = "two sequences (the step computing and the next one)" if args.swap else "one sequence"
            first = len(stage_layers(layers, args.stages, 0))  # the largest stage
            whose = f"{layers} layers" if args.stages == 1 else f"the first stage's {first} of {layers} layers"
            parser.error(f"--kv-device-bytes {args.kv_device_bytes} does not hold {what} of --max-model-len {max_len} "
                         f"for {whose} in {dtype}: give at least {need} (or lower --max-model-len)")


def cmd_up(args, parser) -> int:
    if args.colocated:
        args.prompt_services = 0
    elif args.prompt_services < 1:
        parser.error("--prompt-services must be at least 1 (or --colocated)")
    if args.token_services < 1:
        parser.error("--token-services must be at least 1")
    if not 1 <= args.stages <= 64:
        parser.error("--stages must be in 1..64")
    if not 1 <= args.prompt_stages <= 64:
        parser.error("--prompt-stages must be in 1..64")
    if args.cache_stores < 0:
        parser.error("--cache-stores must be >= 0")
    if not 0 <= args.microbatches <= 64:
        parser.error("--microbatches must be in 0..64")
    if args.kv_device_bytes < 0:
        parser.error("--kv-device-bytes must be >= 0")
    if args.swap and not args.kv_device_bytes:
        parser.error("--swap needs --kv-device-bytes (the device's KV budget)")
    if args.swap and args.colocated:
        parser.error("--swap is not for --colocated token services")
    if args.kv_device_bytes and args.kv_blocks and not args.swap:
        parser.error("without --swap, --kv-device-bytes sizes the KV pool: give it or --kv-blocks, not both")
    if args.prefix_cache_mib < 0:
        parser.error("--prefix-cache-mib must be >= 0 (0: off)")
    if not 0 <= args.responses_ttl_s < 10 ** 9:  # (NaN fails this too)
        parser.error("--responses-ttl-s must be >= 0 (0: no response kept) and finite")
    if args.max_queued_requests < 0:
        parser.error("--max-queued-requests must be >= 0 (0: a 429 as soon as every token service is full)")
    if not 0 <= args.kv_shm_mib <= 1024:
        parser.error("--kv-shm-mib must be in 0..1024")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be in 0..65535")
    for name, low in (("max_model_len", 16), ("max_seqs", 1), ("block_size", 1), ("kv_blocks", 0)):
        if getattr(args, name) < low:  # the services would refuse it, but only once the rest had started
            parser.error(f"--{name.replace('_', '-')} must be at least {low}")
    if problem := bind_problem(args.host, args.port):  # (port 0 checks the host alone)
        parser.error(problem)
    if args.redis_url is not None and (problem := redis_problem(args.redis_url)):
        parser.error(f"--redis-url {args.redis_url}: {problem}")
    try:
        path = resolve_model_path(args.model, weights=True)  # convert the bundled model once, with progress, before the services start
    except ModelNotFound as exc:
        parser.error(str(exc))
    _check_model_fits(args, parser, path)
    from dejavu.cluster import Cluster, ClusterError
    from dejavu.redis_server import RedisNotInstalled

    env = {"DEJAVU_KV_TRANSPORT": args.kv_transport, "DEJAVU_KV_SHM_MIB": str(args.kv_shm_mib), "DEJAVU_MAX_MODEL_LEN": str(args.max_model_len),
           "DEJAVU_MAX_SEQS": str(args.max_seqs), "DEJAVU_COLOCATED": str(args.colocated).lower(),
           "DEJAVU_DTYPE": args.dtype, "DEJAVU_BLOCK_SIZE": str(args.block_size), "DEJAVU_KV_BLOCKS": str(args.kv_blocks),
           "DEJAVU_COMPILE": str(args.compile).lower(), "DEJAVU_ENFORCE_EAGER": str(args.enforce_eager).lower(),
           "DEJAVU_MAX_QUEUED_REQUESTS": str(args.max_queued_requests), "DEJAVU_RESPONSES_TTL_S": str(args.responses_ttl_s),
           "DEJAVU_MICROBATCHES": str(args.microbatches), "DEJAVU_KV_DEVICE_BYTES": str(args.kv_device_bytes),
           "DEJAVU_SWAP": str(args.swap).lower(), "DEJAVU_TOOL_CALL_PARSER": args.tool_call_parser,
           "DEJAVU_REASONING_PARSER": args.reasoning_parser,
           "DEJAVU_PREFIX_CACHE_MIB": str(args.prefix_cache_mib),
           "DEJAVU_PREFIX_ROUTING": str(args.prefix_routing == "on").lower()}
    given = args.api_key if args.api_key is not None else [os.environ.get("DEJAVU_API_KEYS", "")]
    keys = [k.strip() for item in given for k in item.split(",")] if any(given) or args.api_key else []
    if not all(keys):  # an empty key would let an empty bearer token in
        parser.error("--api-key / DEJAVU_API_KEYS: every key must be non-empty")
    if keys:
        env["DEJAVU_API_KEYS"] = ",".join(keys)
    elif not is_loopback(args.host):
        print(f"[dejavu] WARNING: --host {args.host} is reachable from other machines and no --api-key is set: "
              f"anyone who can reach port {args.port} can use the API", file=sys.stderr, flush=True)
    placement, placement_line = _cpu_placement(args)
    cluster = Cluster(args.model, args.port, args.prompt_services, args.token_services, args.cache_stores,
                      args.redis_url, env, echo_logs=not args.quiet, host=args.host, placement=placement,
                      stages=args.stages, prompt_stages=args.prompt_stages, end_with_us=True)
    mode = "colocated (token services prefill)" if args.colocated else f"{args.prompt_services} prompt"
    pipes = f" ({args.stages} stages each)" if args.stages > 1 else ""
    prompt_pipes = f" ({args.prompt_stages} stages each)" if args.prompt_stages > 1 and not args.colocated else ""
    print(f"[dejavu] starting: {args.token_services} token{pipes}, {mode}{prompt_pipes}, {args.cache_stores} cache store(s), "
          f"gateway on port {args.port}, KV over {args.kv_transport}, {args.dtype} ...", file=sys.stderr, flush=True)
    print(f"[dejavu] CPU placement: {placement_line}", file=sys.stderr, flush=True)
    start = time.monotonic()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # while starting, SIGTERM = Ctrl-C
    try:
        cluster.start()  # stops whatever it started if it fails or is interrupted
    except KeyboardInterrupt:
        print("[dejavu] interrupted while starting: stopped", file=sys.stderr)
        return 130
    except (ClusterError, RedisNotInstalled, RuntimeError) as exc:
        print(f"[dejavu] {exc}", file=sys.stderr)
        return 1
    record = _record_up(cluster)
    print(f"\n[dejavu] ready in {time.monotonic() - start:.0f} s: OpenAI API at {cluster.url}/v1 "
          f"(redis {cluster.redis_url})\n\n  curl {cluster.url}/v1/completions -H 'Content-Type: application/json' \\\n"
          + ("    -H \"Authorization: Bearer $DEJAVU_API_KEY\" \\\n" if keys else "") +
          f"    -d '{{\"model\": \"{_served_name(args.model)}\", \"prompt\": \"The capital of France is\", "
          f"\"max_tokens\": 16, \"temperature\": 0}}'\n\n[dejavu] Ctrl-C stops everything.", flush=True)
    try:
        return _watch(cluster)
    finally:  # whatever happens here (even a closed terminal), no child is left behind
        _say("[dejavu] stopping ...")
        cluster.stop()
        if record:
            with contextlib.suppress(OSError):
                os.unlink(record)
        _say("[dejavu] stopped")


def _cpu_placement(args) -> tuple[dict, str]:
    """The engines' placement for --cpu-placement, and the line that says what was chosen."""
    from dejavu import placement

    if args.cpu_placement == "off":
        return {}, "off"
    cores, why_not = placement.host_cores()
    if not cores:
        return {}, f"off ({why_not})"
    plan = placement.plan(cores, args.prompt_services, args.token_services, args.cpu_placement, args.stages,
                          args.prompt_stages)
    return plan, placement.describe(plan, cores)


def _say(message: str) -> None:
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:  # stderr gone (closed pipe or terminal): keep going
        pass


class Restarts:
    """When `dejavu up` starts a dead service again, as compose's `restart: unless-stopped` does
    (Docker doubles its delay too): at once for its first QUICK deaths in a row, then after a delay
    that doubles (1, 2, 4 s ..., at most MAX_DELAY_S), so that one that cannot start does not spin;
    a run of STABLE_S or more ends the row. An engine or a store is never given up: killed again and
    again (the OOM killer, an operator), it comes back, or the cluster would answer 503 until
    someone restarted it all. The gateway, without which nothing is served, is given up when it
    dies more than QUICK times within STABLE_S, and `dejavu up` exits (1) saying so."""

    QUICK = 3
    MAX_DELAY_S = 30.0
    STABLE_S = 60.0

    def __init__(self):
        self.row: dict[str, int] = collections.defaultdict(int)  # name -> deaths in a row
        self.deaths: dict[str, list[float]] = collections.defaultdict(list)  # name -> monotonic times, last STABLE_S

    def delay(self, name: str, ran_s: float, now: float | None = None) -> float:
        """A service died after running ran_s: seconds until it is started again."""
        now = time.monotonic() if now is None else now
        self.deaths[name] = [t for t in self.deaths[name] if now - t < self.STABLE_S] + [now]
        self.row[name] = 1 if ran_s >= self.STABLE_S else self.row[name] + 1
        late = self.row[name] - self.QUICK
        return 0.0 if late <= 0 else min(2.0 ** (late - 1), self.MAX_DELAY_S)

    def give_up(self, name: str, kind: str) -> bool:
        return kind == "gateway" and len(self.deaths[name]) > self.QUICK


def _watch(cluster) -> int:
    """Until SIGINT/SIGTERM/SIGHUP (exit 0). A service that dies is named, with why, and started
    again (`Restarts` says when); its requests resume elsewhere meanwhile. A gateway that keeps
    dying stops everything (exit 1)."""
    stopping, restarts = False, Restarts()
    started = {child.name: time.monotonic() for child in cluster.children}
    due: dict[str, float] = {}  # name -> monotonic time a dead one is started again

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    while not stopping:
        now = time.monotonic()
        for child in cluster.dead():
            if child.name not in due:  # newly dead
                _say(f"[dejavu] {child.describe_exit()}")
                wait = restarts.delay(child.name, now - started.get(child.name, now))
                if restarts.give_up(child.name, child.kind):
                    _say(f"[dejavu] the gateway died {len(restarts.deaths[child.name])} times within a minute: stopping")
                    return 1
                if wait:
                    _say(f"[dejavu] {child.name} died {restarts.row[child.name]} times in a row: "
                         f"restarting it in {wait:.0f} s")
                due[child.name] = now + wait
            if now >= due[child.name]:
                try:
                    new = cluster.respawn(child)
                except OSError as exc:  # no process to be had (ENOMEM, EAGAIN, EMFILE): try again later
                    due[child.name] = now + Restarts.MAX_DELAY_S
                    _say(f"[dejavu] could not restart {child.name} ({exc}): trying again in {Restarts.MAX_DELAY_S:.0f} s")
                    continue
                del due[child.name]
                started[child.name] = time.monotonic()
                _say(f"[dejavu] restarting {child.name} (new pid {new.pid})")
        if cluster.redis and cluster.redis.proc.poll() is not None:
            _say("[dejavu] the embedded Redis died: restarting it (empty; the services re-register)")
            try:
                cluster.restart_redis()
            except RuntimeError as exc:
                _say(f"[dejavu] could not restart Redis: {exc}")
                return 1
        time.sleep(0.5)
    return 0


def _served_name(model: str) -> str:
    import os

    return os.path.basename(os.path.normpath(model))


def _ups_dir() -> str:
    """Where each running `dejavu up` leaves its gateway and Redis URLs, for `dejavu status`."""
    from common.settings import cache_dir

    return os.path.join(cache_dir(), "up")


def _record_up(cluster) -> str:
    """Write this `dejavu up`'s URLs where `dejavu status` finds them (owner-only: a Redis URL may
    hold a password); returns the file, removed at stop, or "" if it could not be written."""
    path = os.path.join(_ups_dir(), f"{os.getpid()}.json")
    try:
        os.makedirs(_ups_dir(), mode=0o700, exist_ok=True)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump({"pid": os.getpid(), "url": cluster.url, "redis_url": cluster.redis_url}, f)
    except OSError as exc:  # only `dejavu status` without --redis-url misses it
        print(f"[dejavu] could not record this cluster for `dejavu status` in {path}: {exc}", file=sys.stderr)
        return ""
    return path


def _running_ups() -> list[dict]:
    """The `dejavu up` of this machine still running (files of dead ones are removed)."""
    found = []
    try:
        names = sorted(os.listdir(_ups_dir()))
    except OSError:
        return []
    for name in names:
        path = os.path.join(_ups_dir(), name)
        try:
            with open(path) as f:
                up = json.load(f)
            os.kill(int(up["pid"]), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(up.get("redis_url"), str) and isinstance(up.get("url"), str):
            found.append(up)
    return found


def cmd_status(args) -> int:
    """The services registered in Redis: the same entries as the gateway's GET /cluster."""
    from common import metadata
    from common.errors import Unavailable
    from common.protocol import cluster_status

    url, guessed = args.redis_url or os.environ.get("DEJAVU_REDIS_URL", ""), False
    if not url:
        running = _running_ups()
        if len(running) > 1:
            print("dejavu status: several `dejavu up` run here; pick one with --redis-url:\n" + "\n".join(
                f"  --redis-url {r['redis_url']}   (gateway {r['url']}, pid {r['pid']})" for r in running),
                file=sys.stderr)
            return 2
        url, guessed = (running[0]["redis_url"], False) if running else ("redis://127.0.0.1:6379/0", True)
    if not url.startswith(REDIS_SCHEMES):
        print(f"dejavu status: --redis-url {url!r} {BAD_SCHEME}", file=sys.stderr)
        return 2

    async def fetch():
        redis = metadata.connect(url)
        try:
            return await metadata.Registry(redis).services()
        finally:
            await redis.aclose()

    try:
        rows = cluster_status(asyncio.run(fetch()), time.time())["services"]
    except Unavailable as exc:
        print(f"dejavu status: {exc.message}", file=sys.stderr)
        if guessed:
            print("dejavu status: no `dejavu up` runs on this machine (none recorded), and no Redis answers at the "
                  "default address: start one with `dejavu up`, or give the cluster's --redis-url", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    # a space between columns: an id or URL longer than its column must not run into the next
    print(f"{'KIND':<11} {'ID':<35} {'URL':<27} {'PID':>8}{'ACTIVE':>8}{'KV USED':>12}{'KV FREE':>12}{'LEASE':>8}")
    for r in rows:
        if r["kind"] == "stage":  # a pipeline's KV is counted on its head, over every stage's layers
            kv = f"{'(head)':>12}{'(head)':>12}"
        else:
            kv = f"{r['kv_bytes_used'] / 2**20:>10.1f}Mi{r['kv_bytes_free'] / 2**20:>10.1f}Mi"
        print(f"{r['kind']:<11} {r['id']:<35} {r['url']:<27} {r['pid']:>8}{r['active_requests']:>8}{kv}{r['lease_age_s']:>7.1f}s")
    return 0


if __name__ == "__main__":
    main()
