"""Token services as pipelines of stages (`dejavu up --stages S`, token_service/pipeline.py): each
token service is S processes holding a range of the tiny model's 3 layers each, activations moving
stage to stage over the KV transport. Greedy output equals HF `generate` through 2 and 3 stages,
disaggregated (the prompt's KV reaches every stage) and colocated (chunked prefill through the
pipeline); a stage killed mid-stream costs a pause: its head goes down and the request resumes on
the other pipeline; nothing is left held. Two layouts swap (--swap): every stage computes over a
device budget of 40 blocks of its layers, 4 microbatches in flight, the KV of record in host
memory. Their prompt services are pipelines too, each stage streaming its layers' KV straight to
the token stage that holds them, whatever the two depths: 2 prompt stages (layers [0, 2), [2, 3))
into 3 token stages (one layer each), and 3 prompt stages (one layer each) into 2 token stages
([0, 2), [2, 3))."""

from __future__ import annotations

import signal
import time

import httpx
import pytest
import redis

from dejavu.cluster import Cluster
from tests.cluster.conftest import CLUSTER_ENV, metric
from tests.cluster.test_cluster_view import dejavu_status
from tests.cluster.test_colocated import complete_all
from tests.cluster.test_failover import assert_no_kv_held_on, holds_kv, stream
from tests.cluster.test_serving import penalized_cases

PROMPT = "Once upon a time, in a land far away, there lived a dragon who"


def swap_env(stages: int) -> dict:
    """40 blocks of 16 tokens of each layer its largest stage holds of the tiny model's 3 (2 KV heads
    of 16, float32): half of it holds one sequence of --max-model-len."""
    layers = -(-3 // stages)
    return {"DEJAVU_SWAP": "true", "DEJAVU_MICROBATCHES": "4", "DEJAVU_MAX_MODEL_LEN": "320",
            "DEJAVU_KV_DEVICE_BYTES": str(40 * 16 * 2 * 2 * 16 * 4 * layers)}


# (token stages, KV transport, colocated, --swap, prompt services, stages of each)
LAYOUTS = [(2, "tcp", False, False, 1, 1), (3, "ucx", False, True, 2, 2), (2, "tcp", True, False, 0, 1),
           (2, "tcp", False, True, 1, 3)]
IDS = ["2-stages-tcp", "3-stages-ucx-swap-2-prompt-stages", "2-stages-colocated", "2-stages-tcp-swap-3-prompt-stages"]


@pytest.fixture(scope="module", params=LAYOUTS, ids=IDS)
def cluster(request, tiny_model_path, redis_server):
    """Two token pipelines (one a spare), a prompt service (or colocated prefill, in chunks of 16
    tokens), a cache store."""
    stages, transport, colocated, swap, prompts, prompt_stages = request.param
    env = {**CLUSTER_ENV, "DEJAVU_KV_TRANSPORT": transport, "DEJAVU_TOKEN_TIMEOUT_S": "3",
           "DEJAVU_COLOCATED": str(colocated).lower(), "DEJAVU_MAX_BATCH_TOKENS": "16",
           **(swap_env(stages) if swap else {})}
    with Cluster(str(tiny_model_path), port=0, prompt_services=prompts, token_services=2,
                 cache_stores=1, redis_url=redis_server.url, env=env, echo_logs=False, stages=stages,
                 prompt_stages=prompt_stages) as c:
        c.stages, c.swap, c.colocated, c.prompt_stages = stages, swap, colocated, prompt_stages
        yield c


def assert_nothing_held(cluster) -> None:
    """No KV held anywhere, no prompt announced to a stage, nor (--swap) device room on any live
    stage, the heads included."""
    assert_no_kv_held_on(cluster)
    for s in cluster.of("stage"):
        deadline = time.monotonic() + 10  # release frames go out in the background
        while s.proc.poll() is None and metric(s.url, "dejavu_stage_requests") != 0:
            assert time.monotonic() < deadline, f"{s.name} still holds prompts announced to it"
            time.sleep(0.1)
    if cluster.swap:
        for s in cluster.of("token") + cluster.of("stage"):
            if s.proc.poll() is None:
                assert metric(s.url, "dejavu_swap_device_blocks_used") == 0, s.name


def test_greedy_requests_through_the_pipeline_equal_hf(cluster, tiny_oracle):
    heads = httpx.get(cluster.url + "/cluster", timeout=10).json()["services"]
    heads = [s for s in heads if s["kind"] == "token"]
    assert len(heads) == 2 and all(s["stages"] == cluster.stages for s in heads)
    assert len(cluster.of("stage")) == 2 * (cluster.stages - 1)
    prompt_steps = sum(metric(s.url, "dejavu_stage_steps_total") for s in cluster.of("prompt_stage"))
    before = sum(metric(s.url, "dejavu_stage_steps_total") for s in cluster.of("stage"))
    overlapped = sum(metric(t.url, "dejavu_token_overlapped_steps_total") for t in cluster.of("token"))
    swapped = sum(metric(s.url, "dejavu_swap_in_bytes_total") for s in cluster.of("token") + cluster.of("stage"))
    direct, via_head = (sum(metric(s.url, f'dejavu_stage_kv_bytes_total{{via="{via}"}}') for s in cluster.of("stage"))
                        for via in ("direct", "head"))
    heads_sent = {t.name: metric(t.url, "dejavu_token_replicated_bytes_total") for t in cluster.of("token")}
    stages_sent = {s.name: metric(s.url, "dejavu_stage_replicated_bytes_total") for s in cluster.of("stage")}
    complete_all(cluster, tiny_oracle)
    # every stage of a pipeline that replicated sent its own layers to the store (none through the
    # head), and no send failed
    served = [t.name for t in cluster.of("token") if metric(t.url, "dejavu_token_replicated_bytes_total") > heads_sent[t.name]]
    assert served
    for s in cluster.of("stage"):
        if s.name.rsplit("-stage-", 1)[0] in served:
            assert metric(s.url, "dejavu_stage_replicated_bytes_total") > stages_sent[s.name], s.name
    assert sum(metric(s.url, "dejavu_stage_replicate_failures_total") for s in cluster.of("stage")) == 0
    if cluster.prompt_stages > 1:  # the prompt pipelines' stages computed their layers
        assert sum(metric(s.url, "dejavu_stage_steps_total") for s in cluster.of("prompt_stage")) > prompt_steps
    if not cluster.colocated:  # the prompt service sent each stage its layers' KV, none through the head
        assert sum(metric(s.url, 'dejavu_stage_kv_bytes_total{via="direct"}') for s in cluster.of("stage")) > direct
        assert sum(metric(s.url, 'dejavu_stage_kv_bytes_total{via="head"}') for s in cluster.of("stage")) == via_head
    if cluster.swap:  # steps computed over the device's KV, swapped in from the host pool
        assert sum(metric(s.url, "dejavu_swap_in_bytes_total") for s in cluster.of("token") + cluster.of("stage")) > swapped
    assert sum(metric(s.url, "dejavu_stage_steps_total") for s in cluster.of("stage")) > before  # the stages computed
    # concurrent streams run as microbatches, several steps in flight down the pipeline at once
    assert sum(metric(t.url, "dejavu_token_overlapped_steps_total") for t in cluster.of("token")) > overlapped
    for s in cluster.of("stage"):
        health = httpx.get(s.url + "/health", timeout=10).json()
        assert health["kind"] == "stage" and health["linked"] and health["stages"] == cluster.stages
    for body, want in penalized_cases(tiny_oracle):  # drawn on the head from the last stage's logits
        resp = httpx.post(cluster.url + "/v1/completions", json=body, timeout=120)
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == tiny_oracle.tokenizer.decode(
            want, skip_special_tokens=True), body
    assert_nothing_held(cluster)
    # `dejavu status`: a pipeline's KV on its head's row, over all its layers; its stages' rows point there
    table = dejavu_status(cluster.redis_url).stdout.splitlines()[1:]
    rows = {line.split()[1]: line.split() for line in table}
    for head in heads:
        assert all(v.endswith("Mi") and float(v[:-2]) >= 0 for v in rows[head["id"]][5:7]), rows[head["id"]]
        assert float(rows[head["id"]][6][:-2]) > 0, rows[head["id"]]  # room for requests
    stage_rows = [r for r in rows.values() if r[0] == "stage"]
    assert len(stage_rows) == len(cluster.of("stage") + cluster.of("prompt_stage")), table
    assert all(r[5:7] == ["(head)", "(head)"] for r in stage_rows), table


def running_records(cluster) -> list[dict]:
    """The Redis records of the requests running now."""
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        records = [r.hgetall(k) for k in r.scan_iter("dejavu:req:*")]
    finally:
        r.close()
    return [f for f in records if f.get("status") == "running"]


def assert_replicated_per_stage(cluster, record: dict) -> None:
    """Issue #11 item 5: each stage of the pipeline recorded its own layers' index in Redis
    (`rep:<start>:<stop>`), the request's index the least of them."""
    layers = {3: ["rep:0:1", "rep:1:2", "rep:2:3"], 2: ["rep:0:2", "rep:2:3"]}[cluster.stages]
    assert sorted(f for f in record if f.startswith("rep:")) == layers, record
    assert 0 < int(record["replicated"]) == min(int(record[f]) for f in layers), record


def kill_a_stage(cluster, body: dict, after: int = 20, stage: int = -1) -> tuple[str, dict, list]:
    """Stream `body`; after `after` chunks SIGKILL a stage (the last by default; 0: the head) of the
    pipeline serving it, once Redis shows every stage replicated some of it."""
    victims = []

    def fault(c):
        head = next(t for t in c.of("token") if holds_kv(t))
        deadline = time.monotonic() + 10
        while not (records := running_records(c)) or int(records[0].get("replicated", 0)) == 0:
            assert time.monotonic() < deadline, f"nothing of the request replicated: {records}"
            time.sleep(0.01)
        assert_replicated_per_stage(c, records[0])
        k = stage % c.stages
        victims.append((head, head if k == 0 else next(s for s in c.of("stage") if s.name == f"{head.name}-stage-{k}")))
        c.kill(victims[0][1], signal.SIGKILL)

    text, usage, _ = stream(cluster, body, at={after: fault})
    assert victims, "the fault was never injected"
    return text, usage, victims[0]


def token_ids(cluster) -> set[str]:
    return {s["id"] for s in httpx.get(cluster.url + "/cluster", timeout=10).json()["services"] if s["kind"] == "token"}


def restart(cluster, *children) -> None:
    """What `dejavu up` does with dead processes: the same names, a new pipeline (its head
    registers under a new id once its stages are linked)."""
    before = token_ids(cluster)
    for child in children:
        cluster.respawn(child)
    cluster.wait_ready(120)
    deadline = time.monotonic() + 60
    while not token_ids(cluster) - before:
        assert time.monotonic() < deadline, "the restarted head never registered"
        time.sleep(0.2)


def test_echo_with_logprobs_is_scored_where_one_process_prefills_and_a_400_elsewhere(cluster, tiny_oracle):
    """The prompt's logprobs need the whole model in the process that prefills it: a one-stage
    prompt service scores the prompt (whatever the token pipeline's depth); a prompt pipeline or a
    colocated token pipeline gets a clear 400 on 'echo', and the reservation is let go."""
    ids = tiny_oracle.tokenizer(PROMPT)["input_ids"]
    resp = httpx.post(cluster.url + "/v1/completions", json={"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 3,
                                                              "temperature": 0}, timeout=120)
    if cluster.colocated or cluster.prompt_stages > 1:
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "echo" and "--stages" in resp.json()["error"]["message"]
    else:
        assert resp.status_code == 200, resp.text
        choice = resp.json()["choices"][0]
        assert choice["text"].endswith(tiny_oracle.text(ids, 3)[0])
        assert len(choice["logprobs"]["token_logprobs"]) == len(ids) + 3 and choice["logprobs"]["token_logprobs"][0] is None
    assert_nothing_held(cluster)


@pytest.mark.parametrize("victim", ["last", "head-or-middle"])
def test_a_stage_killed_mid_stream_costs_a_pause(cluster, tiny_oracle, victim):
    """SIGKILL a stage of the pipeline serving a stream, once Redis shows each stage replicated its
    own layers: the last; the head (2 stages) or the middle one (3 stages). The head fails with its
    pipeline (or is the one killed), the gateway resumes the request on the other pipeline from its
    replica (every layer, put together on the store from each stage's sends); the text is
    generate's; each stage of that pipeline fetched its own layers from the store (none came from
    its head). Restarted, the pipeline serves again (a head restarted alone links to its live
    stages again)."""
    ids = tiny_oracle.tokenizer(PROMPT)["input_ids"]
    via = {v: {s.name: metric(s.url, f'dejavu_stage_kv_bytes_total{{via="{v}"}}') for s in cluster.of("stage")}
           for v in ("store", "head")}
    want, n = tiny_oracle.text(ids, 300)
    recoveries = metric(cluster.url, 'dejavu_gateway_recoveries_total{path="replica"}')
    k = -1 if victim == "last" else cluster.stages // 2 - (cluster.stages == 2)  # 2 stages: 0; 3: 1
    body = {"prompt": PROMPT, "max_tokens": 300, "temperature": 0}
    text, usage, (head, stage) = kill_a_stage(cluster, body, stage=k)
    assert text == want and usage["completion_tokens"] == n
    assert metric(cluster.url, 'dejavu_gateway_recoveries_total{path="replica"}') == recoveries + 1
    assert head.proc.wait(10) in (70, -signal.SIGKILL)  # the head ended with its pipeline
    resumed = [s for s in cluster.of("stage") if not s.name.startswith(head.name + "-")]
    assert resumed and all(metric(s.url, 'dejavu_stage_kv_bytes_total{via="store"}') > via["store"][s.name]
                           for s in resumed), "a stage of the resuming pipeline did not fetch its layers"
    assert all(metric(s.url, 'dejavu_stage_kv_bytes_total{via="head"}') == via["head"][s.name] for s in resumed)
    assert_nothing_held(cluster)  # the replica too, once the request ended
    restart(cluster, *{stage.name: stage, head.name: head}.values())
    for t in cluster.of("token"):  # the restarted pipeline serves: the other one is made busy first
        if t.name != head.name:
            cluster.kill(t, signal.SIGSTOP)
    try:
        complete_all(cluster, tiny_oracle, [PROMPT], max_tokens=20)
    finally:
        for t in cluster.of("token"):
            t.proc.send_signal(signal.SIGCONT)
    assert_nothing_held(cluster)


def test_seeded_sampling_is_identical_across_a_stage_failure(cluster):
    """With penalties too: the pipeline that resumes the request counts the tokens out before it."""
    body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 0.8, "top_p": 0.95, "seed": 7, "ignore_eos": True,
            "frequency_penalty": 0.4, "repetition_penalty": 1.1}
    clean, _, _ = stream(cluster, body)
    failed, usage, (head, stage) = kill_a_stage(cluster, body, after=40)
    assert failed == clean and usage["completion_tokens"] == 200
    head.proc.wait(10)
    assert_nothing_held(cluster)
    restart(cluster, stage, head)


def test_a_head_waiting_for_its_stages_says_so_and_stops_on_sigterm(tiny_model_path, redis_server):
    """No stage ever registers: the head logs what it waits for, is not registered as a token
    service meanwhile, and SIGTERM stops it at once (it waits outside uvicorn's start-up)."""
    import os
    import queue
    import subprocess
    import sys
    import threading

    import redis as redis_client

    env = {**os.environ, "DEJAVU_MODEL": str(tiny_model_path), "DEJAVU_REDIS_URL": redis_server.url,
           "DEJAVU_STAGES": "2", "DEJAVU_PIPELINE": "lonely", "DEJAVU_KV_TRANSPORT": "tcp", "DEJAVU_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "token_service"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        seen = []
        while not seen or "waiting" not in seen[-1]:
            seen.append(lines.get(timeout=120))  # queue.Empty: it never said it waits
        assert "pipeline lonely: waiting" in seen[-1] and "stage(s) 1 not registered" in seen[-1], seen[-5:]
        r = redis_client.Redis.from_url(redis_server.url)
        assert not any(b'"lonely"' in (r.get(k) or b"") for k in r.keys("*svc:*"))  # not registered while it waits
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)  # uvicorn re-raises the signal once it has shut down: the code is -15 either way
        time.sleep(0.5)  # the reader thread drains the pipe
        assert any("Application shutdown complete" in line for line in list(lines.queue))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("cluster", [LAYOUTS[1]], indirect=True, ids=[IDS[1]])  # the layout with prompt pipelines
def test_a_prompt_stage_killed_costs_no_request(cluster, tiny_oracle):
    """SIGKILL a stage of one prompt pipeline: its head ends (exit 70) with it, and requests sent
    then are prefilled by the other prompt pipeline, their text generate's. Restarted, both serve."""
    head = cluster.of("prompt")[0]
    stage = next(s for s in cluster.of("prompt_stage") if s.name == f"{head.name}-stage-1")
    cluster.kill(stage, signal.SIGKILL)
    complete_all(cluster, tiny_oracle, max_tokens=12)
    assert head.proc.wait(30) == 70
    for child in (stage, head):
        cluster.respawn(child)
    cluster.wait_ready(120)
    deadline = time.monotonic() + 30
    while len([s for s in httpx.get(cluster.url + "/cluster", timeout=10).json()["services"] if s["kind"] == "prompt"]) < 2:
        assert time.monotonic() < deadline, "the restarted prompt head never registered"
        time.sleep(0.2)
    complete_all(cluster, tiny_oracle, max_tokens=12)
    assert_nothing_held(cluster)
