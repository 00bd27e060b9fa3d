"""The CUDA path end to end in one run, under 5 minutes on a GPU machine (issue #9, item 7).

    scripts/gpu_check.sh [--allow-cpu] [--model smollm2|PATH] [--dtype bfloat16] [--kv-transport ucx|tcp]
                         [--out DIR]
    scripts/gpu_check.sh --save-tiny-model DIR    # a ~16 MB random Llama that can travel to a device

Each step is a check; a failed one is recorded and the run goes on where it can:

1. environment: torch, CUDA and the GPU, the CPU, ucxx, redis-server, the imports the services
   need. No CUDA and no --allow-cpu, or something missing: exit 2, saying what is missing.
2. model: the bundled SmolLM2-135M (converted once) or --model, served in --dtype.
3. cluster: real processes (1 prompt service, 2 token services, 1 cache store, the gateway, an
   embedded Redis), KV over UCX; every engine must report --dtype in GET /cluster; their ready
   lines and the GPU memory they hold say where they run.
4. greedy: one stream without a failure (the cache store must hold replica bytes meanwhile), then
   the same with the serving token service SIGKILLed after 60 chunks: the same text, and one more
   recovery from the replica. The victim is restarted.
5. seeded (temperature 0.8, seed 7, ignore_eos): clean against killed, the same text.
   On CUDA, the token services must have replayed decode steps from CUDA graphs meanwhile
   (dejavu_engine_cuda_graph_replays on their /metrics).
6. bench.serve in a small configuration; its JSON and log land in --out. With --compare-eager,
   again with every token service --enforce-eager (serve-eager.json): CUDA graphs against none.
7. --out/summary.json: the environment, each check's result and time; PASS or FAIL printed.

Exit code: 0 every check passed, 1 one failed, 2 it cannot run here, 130 interrupted. Every
process it starts is stopped on the way out, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repo's packages, installed or not; the services get it too:
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

PROMPT = "Once upon a time, in a land far away, there lived a dragon who"
GREEDY = {"prompt": PROMPT, "max_tokens": 200, "temperature": 0}
SEEDED = {"prompt": PROMPT, "max_tokens": 150, "temperature": 0.8, "seed": 7, "ignore_eos": True}
KILL_AFTER = 60  # streamed chunks
NEEDED = ("torch", "transformers", "safetensors", "numpy", "fastapi", "starlette", "uvicorn", "httpx", "redis",
          "pydantic", "prometheus_client")
SERVE = {"gpu": "--repeats 2 --prompt-tokens 200 --new-tokens 128 --concurrency 1,16",  # ~1 min on a GPU
         "cpu": "--repeats 1 --prompt-tokens 32 --new-tokens 16 --concurrency 1"}
SERVE_TIMEOUT_S = {"gpu": 180.0, "cpu": 300.0}


class CheckFailed(Exception):
    pass


@dataclass
class Check:
    name: str
    ok: bool
    seconds: float
    detail: str


@dataclass
class Completion:
    text: str
    tokens: int  # completion tokens (the stream's usage)

    def __str__(self) -> str:
        return f"{self.tokens} tokens: {self.text[:70]!r}..."


def log(message: str) -> None:
    print(f"[gpu_check] {message}", flush=True)


class Checks:
    def __init__(self):
        self.done: list[Check] = []
        self.notes: dict[str, str] = {}  # what was seen on the way, for the summary

    def run(self, name: str, fn, *args):
        """Run one check: fn returns a result (passed: its str is the detail) or raises (failed).
        Returns the result, or None if it failed."""
        log(f"{name} ...")
        start = time.monotonic()
        try:
            result = fn(*args)
            detail, ok = str(result), True
        except Exception as exc:  # noqa: BLE001 - a failed check is recorded, the run goes on
            result, detail, ok = None, f"{type(exc).__name__}: {exc}", False
        self.done.append(Check(name, ok, round(time.monotonic() - start, 2), detail))
        log(f"{name}: {'ok' if ok else 'FAILED'} ({self.done[-1].seconds:.1f} s) {detail}")
        return result

    def skip(self, name: str, why: str) -> None:
        self.done.append(Check(name, False, 0.0, f"skipped: {why}"))
        log(f"{name}: FAILED (skipped: {why})")

    @property
    def passed(self) -> bool:
        return bool(self.done) and all(c.ok for c in self.done)


# --- 1. the environment -------------------------------------------------------------------------

def environment(transport: str) -> dict:
    errors = import_errors(NEEDED + ("ucxx",))
    missing = [f"{m} ({errors[m]})" for m in NEEDED if m in errors]
    env = {"torch": None, "torch_cuda": None, "cuda_available": False}
    if "torch" not in errors:
        import torch

        from bench.common import machine  # CPU model, cores, memory, Python, torch, commit, date

        env = {**machine(), "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
        if env["cuda_available"]:
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return {**env, "ucxx": errors.get("ucxx", "importable"), "redis_server": shutil.which("redis-server"),
            "missing_modules": missing, "transport": transport}


def import_errors(modules: tuple[str, ...]) -> dict[str, str]:
    """module -> why it does not import, tried in a fresh interpreter (as the services will)."""
    code = ("import importlib, json, sys\nerrors = {}\nfor m in sys.argv[1:]:\n    try:\n"
            "        importlib.import_module(m)\n    except Exception as exc:\n"
            "        errors[m] = f'{type(exc).__name__}: {exc}'\nprint(json.dumps(errors))")
    run = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        return {m: f"the import check itself failed: {run.stderr.strip()[-300:]}" for m in modules}
    return json.loads(run.stdout.strip().splitlines()[-1])


def blockers(env: dict, allow_cpu: bool) -> list[str]:
    """What keeps this run from starting here."""
    why = []
    if env["torch"] and not env["cuda_available"] and not allow_cpu:
        build = f"built for CUDA {env['torch_cuda']}" if env["torch_cuda"] else "a CPU-only build"
        why.append(f"no CUDA device: torch {env['torch']} ({build}) sees none; "
                   "pass --allow-cpu to run the same checks on the CPU")
    if env["missing_modules"]:
        why.append(f"Python modules missing: {', '.join(env['missing_modules'])} (carry them as wheels, "
                   "see scripts/gpu_check.sh)")
    if env["transport"] == "ucx" and env["ucxx"] != "importable":
        why.append(f"ucxx does not import ({env['ucxx']}): carry it, or --kv-transport tcp")
    if not env["redis_server"]:
        why.append("redis-server is not on PATH (carry the binary, see scripts/gpu_check.sh)")
    return why


# --- 3. the cluster -----------------------------------------------------------------------------

def metric(url: str, name: str, **labels: str) -> float:
    """A sample's value from a service's Prometheus /metrics (0 if it has none yet)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def check_dtype(cluster, dtype: str) -> str:
    import httpx

    services = httpx.get(cluster.url + "/cluster", timeout=10).json()["services"]
    engines = {f"{s['kind']} pid {s['pid']}": s.get("dtype") for s in services if s["kind"] in ("prompt", "token")}
    if len(engines) != 3 or set(engines.values()) != {dtype}:
        raise CheckFailed(f"want 3 engines in {dtype}, GET /cluster lists {engines}")
    return f"{engines}"


def where_engines_run(cluster, gpu_used_before: int | None) -> str:
    """Each engine's ready line (dtype, forward; it names no device) and, with CUDA, the GPU memory
    the cluster took (an engine puts the model on the GPU whenever torch sees one: engine/checkpoint.py)."""
    lines = []
    for child in cluster.of("prompt") + cluster.of("token"):
        ready = next((line for line in child.tail if "service ready:" in line), "service ready: (line not kept)")
        lines.append(f"{child.name} (pid {child.pid}): {ready[ready.find('service ready:'):][:160]}")
    if gpu_used_before is None:
        lines.append("device: cpu (torch sees no CUDA device here)")
    else:
        used = gpu_memory_used() - gpu_used_before
        lines.append(f"device: GPU memory taken by the cluster {used / 2**20:.0f} MiB "
                     f"({'the engines run on the GPU' if used > 256 * 2**20 else 'too little: engines on the CPU?'})")
    return "\n".join(lines)


def gpu_memory_used() -> int:
    import torch

    free, total = torch.cuda.mem_get_info(0)
    return total - free


# --- 4, 5. requests, with and without a failure -------------------------------------------------

def stream(url: str, body: dict, at: dict | None = None, timeout: float = 600.0) -> Completion:
    """A streaming completion; at[n](text so far) runs after the n-th chunk; an error event fails it."""
    import httpx

    text, usage = [], {}
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as resp:
        if resp.status_code != 200:
            raise CheckFailed(f"HTTP {resp.status_code}: {resp.read().decode(errors='replace')[:300]}")
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise CheckFailed(f"error event after {len(text)} chunks: {event['error']}")
            usage = event.get("usage") or usage
            if event["choices"]:
                text.append(event["choices"][0]["text"])
                if at and len(text) in at:
                    at[len(text)]("".join(text))
    return Completion("".join(text), usage.get("completion_tokens", 0))


def serving(cluster):
    """The token service holding KV right now (as tests/cluster/test_failover.py finds it)."""
    holders = [t for t in cluster.of("token") if t.proc.poll() is None and metric(t.url, "dejavu_token_sequences")]
    if len(holders) != 1:
        raise CheckFailed(f"{len(holders)} token services hold KV; exactly one should")
    return holders[0]


def clean_run(cluster, body: dict, store_bytes: list[float]) -> Completion:
    """One stream without a failure, sampling the cache store's replica bytes along the way."""
    def sample(_):
        store_bytes.append(sum(metric(s.url, "dejavu_cache_store_bytes_held") for s in cluster.of("cache_store")))

    return stream(cluster.url, body, at={n: sample for n in (20, 40, 60)})


def killed_run(cluster, body: dict, clean: Completion) -> str:
    """The same stream with its token service SIGKILLed after KILL_AFTER chunks; the victim restarts.
    The victim is found at the first chunk: at the kill a fast engine may be done already."""
    before = metric(cluster.url, "dejavu_gateway_recoveries_total", path="replica")
    found, victims, at_char = [], [], []

    def kill(text: str):
        cluster.kill(found[0], signal.SIGKILL)
        victims.append(found[0])
        at_char.append(len(text))

    try:
        failed = stream(cluster.url, body, at={1: lambda _: found.append(serving(cluster)), KILL_AFTER: kill})
    finally:
        respawned = [cluster.respawn(v) for v in victims]  # back to two token services for the next case
    if not victims:
        raise CheckFailed(f"the stream ended after {failed.tokens} tokens, before chunk {KILL_AFTER}: "
                          "nothing was killed")
    recovered = metric(cluster.url, "dejavu_gateway_recoveries_total", path="replica") - before
    cluster.wait_ready(300, respawned)
    what = (f"{victims[0].name} (pid {victims[0].pid}) killed after {KILL_AFTER} chunks (character {at_char[0]}); "
            f"{failed.tokens} tokens (clean: {clean.tokens}); {recovered:g} replica recoveries (want 1)")
    if failed.text != clean.text:
        i = next((i for i, (a, b) in enumerate(zip(clean.text, failed.text)) if a != b),
                 min(len(clean.text), len(failed.text)))
        raise CheckFailed(f"texts differ from character {i} of {len(clean.text)}: clean {clean.text[i:i + 40]!r}, "
                          f"killed {failed.text[i:i + 40]!r}; {what}")
    if failed.tokens != clean.tokens or recovered != 1:
        raise CheckFailed(what + ("" if recovered else ": the token service was done before the kill?"))
    return what + ": the same text"


def run_cluster_checks(checks: Checks, args, model: str, engine_env: dict, gpu_used_before: int | None) -> None:
    from dejavu.cluster import Cluster

    cluster = Cluster(model, port=0, prompt_services=1, token_services=2, cache_stores=1, env=engine_env,
                      echo_logs=False)
    started = lambda: cluster.start(timeout=300) and f"ready at {cluster.url}; pids " + ", ".join(  # noqa: E731
        f"{c.name} {c.pid}" for c in cluster.children)
    if checks.run("cluster starts", started) is None:
        return  # start() stopped what it had started
    try:
        checks.run("every engine reports the dtype", check_dtype, cluster, args.dtype)
        checks.notes["where the engines run"] = where = where_engines_run(cluster, gpu_used_before)
        log("where the engines run:\n    " + where.replace("\n", "\n    "))
        store_bytes: list[float] = []
        greedy = checks.run("greedy stream, clean", lambda: clean_run(cluster, GREEDY, store_bytes))
        checks.run("replication observed", lambda: _held(store_bytes))
        if greedy:
            checks.run("greedy stream, token service killed: same text", killed_run, cluster, GREEDY, greedy)
        else:
            checks.skip("greedy stream, token service killed: same text", "no clean stream to compare with")
        seeded = checks.run("seeded stream, clean", lambda: stream(cluster.url, SEEDED))
        if seeded:
            checks.run("seeded stream, token service killed: same text", killed_run, cluster, SEEDED, seeded)
        else:
            checks.skip("seeded stream, token service killed: same text", "no clean stream to compare with")
        if gpu_used_before is not None:
            checks.run("decode steps replayed from CUDA graphs", graph_replays, cluster)
    finally:
        if not checks.passed:  # what the services said last, to see why
            checks.notes["service logs"] = "\n".join(
                f"{c.name} (pid {c.pid}{', exited ' + str(c.proc.poll()) if c.proc.poll() is not None else ''}): "
                + " | ".join(list(c.tail)[-8:]) for c in cluster.children)
        cluster.stop()  # Ctrl-C and SIGTERM too


def graph_replays(cluster) -> str:
    """Each token service's CUDA graph counters, from its /metrics: replays must be > 0 somewhere."""
    import httpx

    def value(text: str, name: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

    seen = []
    for child in cluster.of("token"):
        text = httpx.get(f"{child.url}/metrics", timeout=10).text  # open, as /health is
        seen.append((child.name, *(value(text, f"dejavu_engine_cuda_graph_{name}_total")
                                   for name in ("replays", "captures", "capture_seconds"))))
    said = "; ".join(f"{n}: {r:.0f} replays, {c:.0f} graphs captured in {s:.2f} s" for n, r, c, s in seen)
    if not any(r > 0 for _, r, _, _ in seen):
        raise CheckFailed(f"no decode step was replayed from a CUDA graph: {said}")
    return said


def _held(samples: list[float]) -> str:
    if not samples or max(samples) <= 0:
        raise CheckFailed(f"dejavu_cache_store_bytes_held during the stream: {samples} (want > 0)")
    return f"cache store held {max(samples) / 2**20:.2f} MiB of replica during the stream (samples {samples})"


# --- 6. bench.serve -----------------------------------------------------------------------------

def run_serve(model: str, out: Path, mode: str, engine_env: dict, name: str = "serve") -> str:
    """python -m bench.serve in its own session (one SIGINT on the way out lets it stop its cluster);
    its JSON and log go to out/{name}.json and .log."""
    cmd = [sys.executable, "-m", "bench.serve", "--model", model, *SERVE[mode].split(),
           "--out", str(out / f"{name}.json")]
    log("  " + " ".join(cmd[1:]))
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **engine_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    timer = threading.Timer(SERVE_TIMEOUT_S[mode], proc.send_signal, [signal.SIGINT])
    timer.start()
    try:
        with open(out / f"{name}.log", "w") as fh:
            for line in proc.stdout:
                fh.write(line)
                print("    " + line.rstrip(), flush=True)
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if proc.returncode != 0:
        raise CheckFailed(f"bench.serve exited with {proc.returncode} (timeout {SERVE_TIMEOUT_S[mode]:.0f} s); "
                          f"see {out / f'{name}.log'}")
    summary = json.loads((out / f"{name}.json").read_text())["summary"]
    return "; ".join(f"{k} {v:.1f}" for k, v in summary.items() if isinstance(v, float))


# --- the run ------------------------------------------------------------------------------------

def save_tiny_model(folder: Path, like: str | None = None) -> None:
    """A Llama with random weights (seeded) and SmolLM2's tokenizer: by default 2 layers of 64 (the
    cluster tests' model, ~16 MB); with `like`, the architecture of that config.json (e.g. SmolLM2's,
    135M parameters) so that a device's figures mean something. Tokenizer files already in `folder`
    are kept: a device machine, which has no bundled model, is sent them alone (3.5 MB) and writes
    the weights itself."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    if like:
        config = LlamaConfig.from_pretrained(like)
        config.max_position_embeddings = min(config.max_position_embeddings, 2048)  # the rotary cache's size; the check uses ~400
    else:
        config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
                             initializer_range=0.1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(folder)
    if not (folder / "tokenizer.json").exists():
        from common.model import resolve_model_path

        bundled = resolve_model_path("smollm2")
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (bundled / name).exists():
                shutil.copy(bundled / name, folder / name)
    log(f"saved a random Llama ({config.num_hidden_layers} layers of {config.hidden_size}) to {folder}: "
        f"--model {folder}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--allow-cpu", action="store_true", help="run the same checks without CUDA")
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a Hugging Face model folder")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--kv-transport", default="ucx", choices=("ucx", "tcp"))
    p.add_argument("--out", default="gpu_check_out", help="summary.json, serve.json and serve.log go here")
    p.add_argument("--compare-eager", action="store_true",
                   help="bench.serve a second time with --enforce-eager (serve-eager.json): without CUDA graphs")
    p.add_argument("--save-tiny-model", metavar="DIR", help="only write a tiny random Llama to DIR, then exit "
                   "(tokenizer files already in DIR are kept; else SmolLM2's are copied)")
    p.add_argument("--like", metavar="CONFIG", help="with --save-tiny-model: the architecture of this config.json "
                   "(or model folder) instead of 2 layers of 64")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.like and not args.save_tiny_model:
        sys.exit("scripts/gpu_check.sh: --like goes with --save-tiny-model")
    if args.save_tiny_model:
        save_tiny_model(Path(args.save_tiny_model), args.like)
        return 0
    start, out = time.monotonic(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    checks, env = Checks(), environment(args.kv_transport)
    log("environment:\n    " + "\n    ".join(f"{k}: {v}" for k, v in env.items()))
    if why := blockers(env, args.allow_cpu):
        log("cannot run here:\n  - " + "\n  - ".join(why))
        write_summary(out, env, checks, start, blocked=why)
        return 2
    mode = "gpu" if env["cuda_available"] else "cpu"
    engine_env = {"DEJAVU_KV_TRANSPORT": args.kv_transport, "DEJAVU_DTYPE": args.dtype, "DEJAVU_TOKEN_TIMEOUT_S": "3",
                  "DEJAVU_MAX_MODEL_LEN": "1024", "DEJAVU_MAX_SEQS": "8"}
    if mode == "cpu":
        engine_env["DEJAVU_THREADS"] = "1"  # a shared CPU: one torch thread per engine
    try:
        from common.model import resolve_model_path

        model = checks.run("model", lambda: str(resolve_model_path(args.model, progress=log).resolve()))
        if model:
            run_cluster_checks(checks, args, model, engine_env, gpu_memory_used() if mode == "gpu" else None)
            checks.run("bench.serve", run_serve, model, out, mode, engine_env)
            if args.compare_eager:
                checks.run("bench.serve, --enforce-eager", run_serve, model, out, mode,
                           {**engine_env, "DEJAVU_ENFORCE_EAGER": "true"}, "serve-eager")
    except KeyboardInterrupt:
        log("interrupted: every process started was stopped")
        write_summary(out, env, checks, start, blocked=["interrupted"])
        return 130
    write_summary(out, env, checks, start)
    return 0 if checks.passed else 1


def write_summary(out: Path, env: dict, checks: Checks, start: float, blocked: list[str] = ()) -> None:
    total = time.monotonic() - start
    summary = {"passed": checks.passed and not blocked, "wall_s": round(total, 1), "blocked": list(blocked),
               "environment": env, "notes": checks.notes, "checks": [asdict(c) for c in checks.done]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    for c in checks.done:
        print(f"{'PASS' if c.ok else 'FAIL'}  {c.seconds:6.1f} s  {c.name}")
    failed = [c.name for c in checks.done if not c.ok]
    print(f"{'PASS' if summary['passed'] else 'FAIL'}: {sum(c.ok for c in checks.done)} of {len(checks.done)} "
          f"checks passed in {total:.0f} s{'; failed: ' + ', '.join(failed) if failed else ''}"
          f"{'; not run: ' + '; '.join(blocked) if blocked else ''} ({out / 'summary.json'})")


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM too: the `finally` blocks stop what was started


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
