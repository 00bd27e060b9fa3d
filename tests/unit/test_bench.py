"""The benchmarks keep working: each runs end to end on a small size and writes its headline
figures. (What they measure is not checked here: they are benchmarks, not tests.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.common import percentile, spread
from common.model import load_tokenizer
from dejavu.cli import BENCHMARKS


def test_percentile_and_spread():
    assert percentile([3, 1, 2, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile(list(range(101)), 95) == 95
    assert spread([3, 1, 2]) == {"median": 2, "min": 1, "max": 3}


def test_dejavu_bench_kv_writes_its_summary_and_plot(tmp_path):
    out = tmp_path / "kv.json"
    run = subprocess.run([sys.executable, "-m", "dejavu", "bench", "kv", "--transports", "tcp+cma,ucx-shm", "--sizes-mib", "1",
                          "--repeats", "1", "--tokens", "16", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["default_transport"] == "ucx+cma"
    assert summary["fraction_of_memcpy_tcp_cma_1mib"] > 0 and summary["buffered_speedup"] > 0
    assert summary["small_frame_rtt_ms_tcp_cma"] > 0 and summary["small_frame_rtt_ms_ucx_shm"] > 0
    assert "ms a round trip" in run.stdout
    assert (tmp_path / "kv-throughput.png").stat().st_size > 0
    assert "naive/buffered" in run.stdout


def test_dejavu_bench_lists_the_benchmarks():
    run = subprocess.run([sys.executable, "-m", "dejavu", "bench", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    for name in ("kv", "stream", "load", "failure"):
        assert f"{name}:" in run.stdout


@pytest.mark.full  # ~15 s: four token-service starts; tests/unit/test_checkpoint.py covers what it times
def test_dejavu_bench_startup_times_a_token_service_in_two_trees(tmp_path, tiny_model_path):
    out = tmp_path / "startup.json"
    run = subprocess.run([sys.executable, "-m", "dejavu", "bench", "startup", "--model", str(tiny_model_path), "--what",
                          "token", "--repeats", "1", "--baseline-tree", ".", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]["token"]
    assert summary["this tree"]["median"] > 0 and summary["baseline"]["median"] > 0
    assert json.loads(out.read_text())["summary"]["token_memory_mib"]["baseline"]["rss_mib"]["median"] > 0
    assert "baseline / this tree" in run.stdout


@pytest.mark.full  # ~25 s: the scripts end to end; tests/cluster/test_pipeline.py covers what they drive
def test_dejavu_bench_pipeline_runs_its_layouts(tmp_path, tiny_model_path):
    out = tmp_path / "pipeline.json"
    run = subprocess.run([sys.executable, "-m", "dejavu", "bench", "pipeline", "--model", str(tiny_model_path),
                          "--layouts", "1-stage,2-stage", "--repeats", "1", "--concurrency", "4", "--requests", "6",
                          "--prompt-tokens", "8", "--new-tokens", "8", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["ratio_1_stage"] == 1 and summary["tokens_per_s_2_stage"] > 0
    assert len(summary["stage_busy_2_stage"]) == 2  # the head and stage 1
    assert len(summary["prompt_busy_1_stage"]) == 1 and summary["prompt_busy_1_stage"][0] > 0  # its prompt service
    assert "6 requests in a closed loop of 4 concurrent, prompt 8, 4-" in run.stdout


@pytest.mark.full  # ~25 s: the scripts end to end; tests/cluster/test_pipeline.py covers what they drive
def test_dejavu_bench_swap_runs_both_layouts(tmp_path, tiny_model_path):
    """With swapping, more sequences run at once than the device budget holds without it."""
    out = tmp_path / "swap.json"
    run = subprocess.run([sys.executable, "-m", "dejavu", "bench", "swap", "--model", str(tiny_model_path),
                          "--repeats", "1", "--device-seqs", "2", "--microbatches", "3", "--prompt-tokens", "8",
                          "--new-tokens", "24", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["tokens_per_s_swap"] > 0 and summary["ratio_no_swap"] == 1
    assert summary["largest_batch_no_swap"] <= 2 < summary["largest_batch_swap"] <= 3
    assert summary["swapped_bytes_per_token_no_swap"] == 0 < summary["swapped_bytes_per_token_swap"]


def test_bench_load_alternate_takes_turns(monkeypatch):
    """--alternate: with several targets up at once, the requests alone go one each in turn and
    each repeat of the closed loop goes to every target in turn, the order rotating, each turn
    after the host has settled; a target whose warm-up fails is skipped and the others go on.
    Fake OpenAI servers (at the HTTP boundary) record what reaches them, in order."""
    import asyncio
    import threading
    import time

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from bench import load as bench_load
    from dejavu.redis_server import free_port

    events: list[tuple[str, str]] = []  # (server, prompt) of each request as it arrived; ("settle", "") each wait

    async def settled():
        events.append(("settle", ""))
        return 0.0
    monkeypatch.setattr(bench_load, "settle", settled)

    def app(name: str) -> Starlette:
        async def models(request):
            return JSONResponse({"data": [{"id": "m"}]})

        async def completions(request):
            if name == "broken":
                return JSONResponse({"error": {"message": "no"}}, status_code=500)
            body = await request.json()
            events.append((name, body["prompt"]))

            async def chunks():
                for _ in range(body["max_tokens"]):
                    yield 'data: {"choices": [{"text": "x"}]}\n\n'
                yield f'data: {{"choices": [], "usage": {{"completion_tokens": {body["max_tokens"]}}}}}\n\n'
                yield "data: [DONE]\n\n"
            return StreamingResponse(chunks(), media_type="text/event-stream")
        return Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])])

    servers, urls = [], {}
    for name in ("a", "broken", "b"):
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app(name), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        urls[name] = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while not all(server.started for server, _ in servers) and time.monotonic() < deadline:
            time.sleep(0.05)
        args = bench_load.parse_args(["--url", "x", "--rates", "none", "--repeats", "3", "--single", "2",
                                      "--concurrent-output-tokens", "3", "--alternate"])
        concurrent = [[f"r{r} p{i}" for i in range(bench_load.CONCURRENT)] for r in range(1, 4)]
        work = bench_load.Workload({}, [], concurrent, "warm", ["s1 alone", "s2 alone"])
        out, skipped = {}, {}
        asyncio.run(bench_load.measure(urls, args, work, out, skipped))
    finally:
        for server, thread in servers:
            server.should_exit = True
            thread.join(10)
    assert list(out) == ["a", "b"] and "warm-up" in skipped["broken"]
    runs = []  # consecutive runs of one (server, what): "warm", "single", or the closed loop's repeat
    for name, prompt in events:
        what = "settle" if name == "settle" else "warm" if prompt == "warm" else prompt.split()[0]
        if runs and runs[-1][0] == (name, what) and name != "settle":
            runs[-1][1] += 1
        else:
            runs.append([(name, what), 1])
    S = [("settle", "settle"), 1]
    n = bench_load.CONCURRENT
    assert runs == [[("a", "warm"), 1], [("b", "warm"), 1],
                    S, [("a", "s1"), 1], S, [("b", "s1"), 1], S, [("a", "s2"), 1], S, [("b", "s2"), 1],  # alone, in turn
                    S, [("a", "r1"), n], S, [("b", "r1"), n], S, [("b", "r2"), n], S, [("a", "r2"), n],
                    S, [("a", "r3"), n], S, [("b", "r3"), n]]
    for name in out:
        assert len(out[name]["tokens_per_s"]) == 3 and out[name]["errors"] == 0 and out[name]["complete"]
        assert all(r.tokens == 3 for r in out[name]["raw"])
        prompts = [prompt for server, prompt in events if server == name]
        assert len(prompts) == len(set(prompts)), "a prompt sent to one server twice: its prefix cache would serve it"


def test_bench_load_gives_every_request_a_prompt_of_its_own(bundled_path):
    """The single requests, each repeat of the closed loop and each rate: no prompt twice, none
    sharing a first block with another, so that a prefix cache (ours is on by default) serves none of
    them. The single requests once took the first repeat's prompts: that repeat of ours then ran
    1.2-1.5x faster than the next one."""
    from bench import load as bench_load

    tokenizer = load_tokenizer(bundled_path)
    args = bench_load.parse_args(["--url", "x", "--rates", "0.5", "--requests", "3", "--repeats", "2", "--single", "20",
                                  "--prompt-tokens", "40"])
    work = bench_load.workload(args, tokenizer)
    everything = [work.warmup, *work.single, *[p for rep in work.concurrent for p in rep],
                  *[p for prompts, _ in work.rates.values() for p in prompts]]
    assert len(work.single) == 20 and [len(r) for r in work.concurrent] == [bench_load.CONCURRENT] * 2
    assert len(everything) == 1 + 20 + 2 * bench_load.CONCURRENT + 3
    first_blocks = {tuple(tokenizer(p, add_special_tokens=False)["input_ids"][:16]) for p in everything}
    assert len(first_blocks) == len(everything)


def test_dejavu_bench_lmeval_says_where_the_harness_comes_from(tmp_path):
    """Without lm-evaluation-harness installed, `dejavu bench lmeval` says how to install it (a usage
    error, nothing started); the task it writes is one the harness reads: 20 questions, 4 choices each."""
    from bench.lmeval import CAPITALS, write_task

    run = subprocess.run([sys.executable, "-m", "dejavu", "bench", "lmeval", "--lm-eval", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "bench/peers.sh lmeval" in run.stderr
    write_task(tmp_path)
    docs = [json.loads(line) for line in (tmp_path / "capitals.jsonl").read_text().splitlines()]
    assert len(docs) == len(CAPITALS) == 20
    for doc, (_, city) in zip(docs, CAPITALS):
        assert len(doc["choices"]) == 4 and doc["choices"][doc["answer"]] == city  # the harness adds the " "
    import yaml

    task = yaml.safe_load((tmp_path / "capitals.yaml").read_text())
    assert task["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "capitals.jsonl")
    assert (task["doc_to_choice"], task["doc_to_target"]) == ("{{choices}}", "{{answer}}")
    assert "{{country}}?\nAnswer:" in task["doc_to_text"]


def test_dejavu_bench_sampling_times_every_kind_against_a_revision(tmp_path):
    """A smoke run: every kind timed on the model's logits, against this checkout's own sampler
    (HEAD: any revision with common/sampling.py), its figures in the JSON."""
    import json

    out = tmp_path / "sampling.json"
    run = subprocess.run([sys.executable, "-m", "dejavu", "bench", "sampling", "--rows", "2", "--repeats", "1",
                          "--passes", "1", "--prompt-tokens", "8", "--output-tokens", "4", "--against", "HEAD",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())["results"][0]
    assert result["rows"] == 2
    assert all(result[k]["ms"]["median"] > 0 for k in ("greedy", "default", "seeded", "bias", "penalties",
                                                       "everything", "greedy@HEAD", "seeded@HEAD"))


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_benchmark_help_says_step_by_step_what_it_does(name, capsys):
    """`dejavu bench NAME --help`, as the README promises: its usage under that name, the steps of a
    run, and the options' defaults (nothing is started: --help exits first)."""
    import importlib

    module = importlib.import_module(f"bench.{name}")
    with pytest.raises(SystemExit) as done:
        (getattr(module, "parse_args", None) or module.main)(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: dejavu bench {name} ") and "tep by step" in text
    options = text.split("\noptions:\n", 1)[1]
    assert "--out FILE.json" in options and "(default: " in options
