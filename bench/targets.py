"""The targets of bench.load: our cluster (disaggregated or colocated), the naive HF server, and
the peers bench/peers.sh installs under .peers/ (llama.cpp's llama-server, vLLM's CPU build).
`started(target, args, model_path)` starts one, yields its URL once /v1/models answers, and always
stops everything it started (a process group of its own for servers that fork)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import log
from dejavu.cluster import Cluster
from dejavu.placement import host_cores, plan
from dejavu.redis_server import free_port

CONCURRENT = 16  # the headline's concurrent requests; every target is sized for them
CLUSTERS = {"disaggregated": (1, {"DEJAVU_MAX_SEQS": "16"}),            # (prompt services, env)
            "colocated": (0, {"DEJAVU_MAX_SEQS": "16", "DEJAVU_COLOCATED": "1"})}
PEER_DIR = Path(__file__).resolve().parents[1] / ".peers"
START_TIMEOUT_S = 600.0


class Skipped(Exception):
    """A target that cannot run here (not installed, failed to start): reported, never a zero."""


# --- the targets: start, wait for /v1/models, always stop ------------------------------------------

@contextlib.contextmanager
def started(target: str, args, model_path: Path):
    if target == "url":
        yield args.url.rstrip("/")
    elif target in CLUSTERS:
        prompt_services, env = CLUSTERS[target]
        cores, _ = host_cores()  # as `dejavu up` places its engines (--cpu-placement)
        mode = getattr(args, "cpu_placement", "auto")
        placement = plan(cores, prompt_services, 1, mode) if cores and mode != "off" else None
        with Cluster(model=args.model, port=0, prompt_services=prompt_services, token_services=1, cache_stores=1,
                     env={**env, "DEJAVU_DTYPE": args.dtype}, echo_logs=False, placement=placement) as cluster:
            yield cluster.url
    else:
        port = free_port()
        with subprocess_server(target, *server_command(target, args, model_path, port), port) as url:
            yield url


def server_command(target: str, args, model_path: Path, port: int, prefix_caching: bool = False) -> tuple[list[str], dict]:
    """The command line and extra environment that start a non-cluster target on `port` (vLLM's
    prefix cache off unless `prefix_caching`: bench.prefix compares ours with it)."""
    if target == "hf":
        return [sys.executable, "-m", "bench.hf_server", "--model", args.model, "--port", str(port)], {}
    if target == "llama.cpp":
        binary, gguf = PEER_DIR / "llama.cpp/build/bin/llama-server", PEER_DIR / "llama.cpp/smollm2-f32.gguf"
        if not (binary.exists() and gguf.exists()):
            raise Skipped(f"llama.cpp is not installed ({binary} or {gguf} missing): run bench/peers.sh llama.cpp")
        if args.model != "smollm2":
            raise Skipped(f"the llama.cpp peer has only the bundled model at f32, not --model {args.model}")
        slot = args.prompt_tokens + max(args.max_output_tokens, args.concurrent_output_tokens) + 16  # tokens
        return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", "2",
                "--parallel", str(CONCURRENT), "-c", str(CONCURRENT * slot), "--cont-batching"], {}
    python = PEER_DIR / "vllm/bin/python"  # vllm
    if not python.exists():
        raise Skipped(f"vLLM is not installed ({python} missing): run bench/peers.sh vllm")
    # no prefix caching for bench.load: the repeats send the same prompts, which it would otherwise serve from memory
    return ([str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path), "--dtype",
             args.dtype, "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(CONCURRENT),
             "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching"],
            {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1"})


@contextlib.contextmanager
def subprocess_server(target: str, cmd: list[str], env: dict, port: int):
    """Run `cmd` in a process group of its own (vLLM forks an engine), its output in a temp file;
    yield its URL once /v1/models answers; always end the whole group, also on errors and Ctrl-C."""
    with tempfile.NamedTemporaryFile(prefix=f"bench-load-{target}-", suffix=".log", delete=False) as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    log(f"{target}: started pid {proc.pid} ({Path(cmd[0]).name} {' '.join(cmd[1:3])} ...), log {out.name}")
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + START_TIMEOUT_S
    try:
        while not answers(url + "/v1/models"):
            last = "\n    ".join(Path(out.name).read_text(errors="replace").splitlines()[-8:])
            if proc.poll() is not None:
                raise Skipped(f"{target} exited with code {proc.returncode} while starting:\n    {last}")
            if time.monotonic() > deadline:
                raise Skipped(f"{target} did not answer /v1/models in {START_TIMEOUT_S:.0f} s:\n    {last}")
            time.sleep(1)
        yield url
    finally:
        stop_group(proc)


def answers(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=5).status_code == 200
    return False


def stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group we started; SIGKILL what is left of it after the grace."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):  # the group outlives its leader while a child lives
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
